<table class="flows">
<thead><tr><th>ID</th><th>Routine</th><th>State</th><th>Step</th><th>Trigger</th><th>Created</th><th>Took</th><th>Error</th></tr></thead>
<tbody>
% for row in flows:
<tr>
  <td><a href="/flows/{{row['id']}}">{{row['id']}}</a></td>
  <td><a href="/flows?{{urlencode({'routine': row['routine']})}}">{{row['routine']}}</a></td>
  <td><span class="state {{row['state'].lower()}}">{{row['state']}}</span></td>
  <td>{{min(row['position'] + 1, row['steps'])}}/{{row['steps']}}</td>
  <td>{{row['trigger']}}</td>
  <td class="time">{{when(row['created_at'])}}</td>
  <td>{{took(row['started_at'], row['finished_at']) if row['started_at'] else '-'}}</td>
  <td class="err">{{(row['error'] or '').strip().splitlines()[-1][:120] if row['error'] else ''}}</td>
</tr>
% end
</tbody>
</table>
