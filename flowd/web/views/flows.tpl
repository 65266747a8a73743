% rebase('base.tpl', title=title)
<h1>Flows</h1>
<form method="get" action="/flows" class="filters">
  <label>State
    <select name="state" id="state-filter">
      <option value="">any</option>
      % for s in STATES:
      <option value="{{s}}" {{'selected' if s == state else ''}}>{{s}} ({{counts.get(s, 0)}})</option>
      % end
    </select>
  </label>
  <label>Routine
    <select name="routine" id="routine-filter">
      <option value="">any</option>
      % for name in routine_names:
      <option value="{{name}}" {{'selected' if name == routine else ''}}>{{name}}</option>
      % end
      % if routine and routine not in routine_names:
      <option value="{{routine}}" selected>{{routine}}</option>
      % end
    </select>
  </label>
  <button type="submit" id="filter">Show</button>
  % if state or routine:
  <a href="/flows">Clear</a>
  % end
</form>
% if flows:
% include('_flowrows.tpl', flows=flows)
% else:
<p class="muted">No flows{{' match' if state or routine else ' yet'}}.</p>
% end
<nav class="pages">
  % if newest:
  <a href="{{newest}}">← Newest</a>
  % end
  % if older:
  <a href="{{older}}" id="older">Older →</a>
  % end
</nav>
