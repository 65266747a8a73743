% rebase('base.tpl', title=title)
<h1>{{title}}</h1>
<p class="notice error">{{text}}</p>
<p><a href="/">Back to the overview</a></p>
