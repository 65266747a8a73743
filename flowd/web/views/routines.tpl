% rebase('base.tpl', title=title)
<h1>Routines</h1>
% if not routines:
<p class="muted">No routines yet: add one with <code>flowctl routine add NAME TASK...</code> or <code>flowctl apply FILE.toml</code>.</p>
% end
% for r in routines:
<section class="card routine {{'' if r['enabled'] else 'disabled'}}" id="routine-{{r['name']}}">
  <div class="routine-head">
    <h2>{{r['name']}} {{!'' if r['enabled'] else '<span class="state cancelled">disabled</span>'}}</h2>
    <form method="post" action="/routines/{{r['name']}}/{{'disable' if r['enabled'] else 'enable'}}">
      <input type="hidden" name="csrf" value="{{csrf}}">
      <button type="submit" class="secondary">{{'Disable' if r['enabled'] else 'Enable'}}</button>
    </form>
  </div>
  <ol class="steps">
    % for s in r['steps']:
    <li><strong>{{s['task']}}</strong> <span class="muted">{{s['script']}}{{', %d retries' % s['retries'] if s['retries'] else ''}}{{', timeout ' + human_duration(s['timeout']) if s['timeout'] else ''}}</span></li>
    % end
  </ol>
  <dl class="facts">
    <dt>Schedule</dt><dd>{{r['schedule'] or 'none (started by MQTT, flowctl or here)'}}{{' (' + r['timezone'] + ')' if r['timezone'] else ''}}</dd>
    % if r['schedule'] and r['enabled']:
    <dt>Next run</dt><dd class="time">{{when(r['next_run']) if r['next_run'] else (r['schedule_error'] or '-')}}</dd>
    % end
    <dt>Mode</dt><dd>{{r['mode']}} (max {{r['max']}})</dd>
    <dt>MQTT</dt><dd>{{'may start it' if r['mqtt'] else 'may not start it'}}</dd>
    <dt>Timeout</dt><dd>{{human_duration(r['timeout']) if r['timeout'] else 'none'}}</dd>
    <dt>Flows</dt><dd><a href="/flows?{{urlencode({'routine': r['name']})}}">show its flows</a></dd>
  </dl>
  % if r['enabled']:
  <form method="post" action="/routines/{{r['name']}}/run" class="run">
    <input type="hidden" name="csrf" value="{{csrf}}">
    <label for="input-{{r['name']}}">Input (JSON, as on <code>flow/submit</code>)</label>
    <textarea name="input" id="input-{{r['name']}}" rows="3" spellcheck="false" placeholder='{"args": [], "kwargs": {}}'>{{inputs.get(r['name'], '')}}</textarea>
    % if r['name'] in errors:
    <p class="notice error">{{errors[r['name']]}}</p>
    % end
    <button type="submit" id="run-{{r['name']}}">Run</button>
  </form>
  % end
</section>
% end
