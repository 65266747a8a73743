% rebase('base.tpl', title=title, refresh=2 if f['state'] in ACTIVE_STATES else None)
% if get('error'):
<p class="notice error">{{error}}</p>
% end
<div id="flow" data-live="/flows/{{f['id']}}/live" data-state="{{f['state']}}">
% include('flow_body.tpl', f=f)
</div>
