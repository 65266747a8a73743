% steps = f['steps']
% active = f['state'] in ACTIVE_STATES
<article class="flow" data-state="{{f['state']}}">
<div class="flow-head">
  <h1>Flow {{f['id']}} <span class="routine">{{f['routine']}}</span> <span class="state {{f['state'].lower()}}" id="flow-state">{{f['state']}}</span></h1>
  <div class="actions">
    % if active:
    <form method="post" action="/flows/{{f['id']}}/cancel"><input type="hidden" name="csrf" value="{{csrf}}"><button type="submit" class="danger" id="cancel">Cancel</button></form>
    % elif f['state'] in ('FAILED', 'CANCELLED'):
    <form method="post" action="/flows/{{f['id']}}/retry"><input type="hidden" name="csrf" value="{{csrf}}"><button type="submit" id="retry">Retry from step {{min(f['position'] + 1, len(steps))}}</button></form>
    % end
  </div>
</div>
<dl class="facts">
  <dt>Step</dt><dd>{{min(f['position'] + 1, len(steps))}}/{{len(steps)}}{{' (' + f['task'] + ')' if f['task'] and f['state'] != 'DONE' else ''}}</dd>
  <dt>Trigger</dt><dd>{{f['trigger']}}{{'  · request id ' + f['request_id'] if f['request_id'] else ''}}{{'  · reply to ' + f['reply_to'] if f['reply_to'] else ''}}</dd>
  <dt>Created</dt><dd class="time">{{when(f['created_at'])}}</dd>
  <dt>Started</dt><dd class="time">{{when(f['started_at'])}}</dd>
  <dt>{{'Ended' if not active else 'Running for'}}</dt><dd class="time">{{when(f['finished_at']) if not active else (took(f['started_at'], None) if f['started_at'] else '-')}}{{'  (took ' + took(f['started_at'], f['finished_at']) + ')' if f['finished_at'] and f['started_at'] else ''}}</dd>
  <dt>UID</dt><dd class="mono">{{f['uid']}}</dd>
  % if f['parent']:
  <dt>Parent</dt><dd><a href="/flows/{{f['parent']}}">flow {{f['parent']}}</a></dd>
  % end
  % if f['children']:
  <dt>Sub-flows</dt><dd>
    % for c in f['children']:
    <a href="/flows/{{c['id']}}">flow {{c['id']}}</a> {{c['routine']}} <span class="state {{c['state'].lower()}}">{{c['state']}}</span><br>
    % end
  </dd>
  % end
  % w = f['waiting_for']
  % if w:
  <dt>Waits for</dt><dd class="waiting">a message on <code>{{w['topic']}}</code>{{' matching ' if w['match'] else ''}}<code>{{pretty(w['match']) if w['match'] else ''}}</code>{{' until ' + when(w['until']) if w['until'] else ''}}</dd>
  % elif f['state'] == 'WAITING':
  <dt>Waits for</dt><dd class="waiting">its sub-flow{{'s' if len(f['children']) > 1 else ''}} to end</dd>
  % end
</dl>
<div class="io">
  <section><h3>Input</h3><pre>{{pretty({'args': f['args'], 'kwargs': f['kwargs']})}}</pre></section>
  % if f['result'] is not None:
  <section><h3>Result</h3><pre id="result">{{pretty(f['result'])}}</pre></section>
  % end
  % if f['error']:
  <section><h3>Error</h3><pre class="error" id="flow-error">{{f['error']}}</pre></section>
  % end
</div>
<h2>Trace</h2>
<table class="trace">
<thead><tr><th>#</th><th>Task</th><th>Try</th><th>State</th><th>Started</th><th>Took</th></tr></thead>
% seen = set()
% for r in f['trace']:
% seen.add(r['position'])
<tbody class="attempt {{r['state'].lower()}}">
<tr class="head">
  <td>{{r['position'] + 1}}</td><td>{{r['task']}}</td><td>{{r['attempt']}}</td>
  <td><span class="state {{r['state'].lower()}}">{{r['state']}}</span></td>
  <td class="time">{{when(r['started_at'])}}</td><td>{{human_duration(r['duration']) if r['finished_at'] else took(r['started_at'], None) + ' …'}}</td>
</tr>
<tr class="detail"><td></td><td colspan="5">
  <div class="io">
    <section><h4>In</h4><pre>{{pretty(r['input'])}}</pre></section>
    % if r['output'] is not None:
    <section><h4>Out</h4><pre>{{pretty(r['output'])}}</pre></section>
    % end
  </div>
  % if r['error']:
  % lines = r['error'].rstrip().splitlines() or ['']
  % frame = script_frame(r['error'])
  <p class="err">{{lines[-1]}}{{'  — at ' + frame if frame else ''}}</p>
  % if len(lines) > 1:
  <details><summary>Traceback</summary><pre class="error">{{r['error']}}</pre></details>
  % end
  % end
</td></tr>
</tbody>
% end
% for position, name in enumerate(steps):
% if position not in seen:
<tbody class="attempt notrun"><tr class="head"><td>{{position + 1}}</td><td>{{name}}</td><td>-</td><td><span class="state notrun">not run</span></td><td></td><td></td></tr></tbody>
% end
% end
</table>
</article>
