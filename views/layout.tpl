<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
% if refresh:
<meta http-equiv="refresh" content="{{refresh}}">
% end
<title>{{title}} - taskscheduler</title>
<style nonce="{{nonce}}">
:root { --fg: #1d2125; --muted: #5b6570; --line: #d8dde3; --bg: #f6f7f9; --card: #fff; }
* { box-sizing: border-box; }
body { margin: 0; font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif;
       color: var(--fg); background: var(--bg); }
header { display: flex; flex-wrap: wrap; gap: .25rem 1rem; align-items: baseline;
         padding: .75rem 1rem; background: #24292f; color: #fff; }
header a { color: #fff; font-weight: 600; text-decoration: none; }
header .updated { color: #c9d1d9; font-size: .85rem; }
main { max-width: 72rem; margin: 0 auto; padding: 1rem; }
h1 { font-size: 1.3rem; margin: .25rem 0 1rem; }
h2 { font-size: 1.1rem; margin: 1.5rem 0 .5rem; }
h3 { font-size: 1rem; margin: 0 0 .25rem; overflow-wrap: anywhere; }
code, pre { font: .9rem/1.4 ui-monospace, "SFMono-Regular", Menlo, Consolas, monospace; }
pre { margin: .25rem 0 .75rem; padding: .5rem; background: #f0f2f4; border: 1px solid var(--line);
      border-radius: 4px; white-space: pre-wrap; overflow-wrap: anywhere; max-height: 30rem; overflow: auto; }
a { color: #0b5cad; }
.card { background: var(--card); border: 1px solid var(--line); border-radius: 6px;
        padding: .75rem; margin: 0 0 .75rem; }
.meta, .empty { color: var(--muted); font-size: .9rem; margin: .15rem 0; }
.hosts { display: flex; flex-wrap: wrap; gap: .4rem; list-style: none; margin: .5rem 0 0; padding: 0; }
.host { border-radius: 4px; padding: .2rem .5rem; font-size: .85rem; border: 1px solid transparent;
        overflow-wrap: anywhere; }
.host .agent { font-weight: 600; }
.status-succeeded { background: #dafbe1; border-color: #4ac26b; }
.status-failed, .status-lost { background: #ffebe9; border-color: #e5534b; }
.status-timed-out, .status-missed { background: #fff1c2; border-color: #d4a72c; }
.status-cancelled, .status-skipped { background: #eef1f4; border-color: #8c959f; }
.status-none { background: #fff; border-color: var(--line); border-style: dashed; }
.state-online { color: #1a7f37; font-weight: 600; }
.state-offline { color: #cf222e; font-weight: 600; }
.table-wrap { overflow-x: auto; }
table { border-collapse: collapse; width: 100%; background: var(--card); font-size: .9rem; }
th, td { text-align: left; padding: .35rem .5rem; border-bottom: 1px solid var(--line); vertical-align: top; }
th { background: #eef1f4; }
dl { display: grid; grid-template-columns: max-content 1fr; gap: .2rem .75rem; margin: 0; }
dt { color: var(--muted); }
dd { margin: 0; overflow-wrap: anywhere; }
@media (max-width: 40rem) {
  main { padding: .5rem; }
  dl { grid-template-columns: 1fr; }
  dd { margin-bottom: .35rem; }
}
</style>
</head>
<body>
<header>
<a href="{{root}}">taskscheduler</a>
<span class="updated">updated {{generated_at}}{{", reloads every %d s" % refresh if refresh else ""}}</span>
</header>
<main>
{{!base}}
</main>
</body>
</html>
