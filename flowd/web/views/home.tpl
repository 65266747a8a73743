% rebase('base.tpl', title=title)
<h1>Overview</h1>
<section class="tiles">
  % d = o['daemon']
  <div class="tile"><div class="label">Daemon</div>
    % if d and not d['stopped_at']:
    <div class="value ok">running</div><div class="sub">pid {{d['pid']}}, flowd {{d['version']}}, since {{when(d['started_at'])}}</div>
    % else:
    <div class="value bad">not running</div>
    % end
  </div>
  <div class="tile"><div class="label">Broker</div>
    % if o['broker_connected']:
    <div class="value ok" id="broker">connected</div>
    % else:
    <div class="value bad" id="broker">not connected</div>
    % end
  </div>
  <div class="tile"><div class="label">Queue</div>
    % if o['queue_error']:
    <div class="value bad">unreachable</div><div class="sub">{{o['queue_error']}}</div>
    % else:
    <div class="value" id="queue-depth">{{o['queue_depth']}}</div><div class="sub">messages waiting for a worker</div>
    % end
  </div>
  <div class="tile"><div class="label">Outbox</div>
    <div class="value" id="outbox">{{o['outbox']}}</div><div class="sub">messages waiting for the broker</div>
  </div>
  % if o['database_bytes'] is not None:
  <div class="tile"><div class="label">Database</div>
    <div class="value">{{human_size(o['database_bytes'])}}</div><div class="sub">on disk, with its log</div>
  </div>
  % end
</section>
<h2>Flows by state</h2>
<section class="states">
% for state in STATES:
  <a class="count state-{{state.lower()}}" href="/flows?state={{state}}" id="count-{{state}}"><span class="n">{{o['flows'].get(state, 0)}}</span><span class="state {{state.lower()}}">{{state}}</span></a>
% end
</section>
<h2>Last failed flows</h2>
% if failed:
% include('_flowrows.tpl', flows=failed)
<p><a href="/flows?state=FAILED">Every failed flow</a></p>
% else:
<p class="muted">No failed flows.</p>
% end
