<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{{title}} · flowd {{node_id}}</title>
<link rel="stylesheet" href="/static/console.css">
<link rel="icon" href="/static/favicon.svg" type="image/svg+xml">
% if get('refresh'):
<noscript><meta http-equiv="refresh" content="{{refresh}}"></noscript>
% end
<script src="/static/console.js" defer></script>
</head>
<body>
<header class="top">
  <a class="brand" href="/"><span class="mark">◆</span> flowd <span class="node">{{node_id}}</span></a>
  <nav>
    <a href="/" class="{{'here' if path == '/' else ''}}">Overview</a>
    <a href="/routines" class="{{'here' if path.startswith('/routines') else ''}}">Routines</a>
    <a href="/flows" class="{{'here' if path.startswith('/flows') else ''}}">Flows</a>
    <a href="/metrics">Metrics</a>
  </nav>
  % if logged_in:
  <form method="post" action="/logout" class="logout"><input type="hidden" name="csrf" value="{{csrf}}"><button type="submit" class="link">Log out</button></form>
  % end
</header>
<main>
{{!base}}
</main>
<footer>flowd {{version}} · node {{node_id}}</footer>
</body>
</html>
