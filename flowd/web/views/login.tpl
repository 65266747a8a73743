% rebase('base.tpl', title=title)
<section class="card narrow">
<h1>Log in</h1>
% if error:
<p class="notice error">{{error}}</p>
% end
<form method="post" action="/login">
  <input type="hidden" name="csrf" value="{{csrf}}">
  <input type="hidden" name="next" value="{{next}}">
  <label>Password <input type="password" name="password" autocomplete="current-password" autofocus required></label>
  <button type="submit">Log in</button>
</form>
</section>
