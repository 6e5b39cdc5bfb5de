"""The report's stylesheet, inlined into report.html (no CDN, no network, no JavaScript).

Zoom is CSS only: every gallery image links to its own job card (`#g0-3`), and the card that is
the URL's :target is drawn as a full-window overlay with larger images; its close link goes to
an anchor that does not exist, which closes it without moving the page.
"""

CSS = """
:root { --ink: #1d2330; --muted: #5c6475; --line: #dde1e8; --bad: #b3261e; --ok: #1e7b34;
  --card: #fff; --bg: #f4f5f8; --thumb: 120px; }
* { box-sizing: border-box; }
body { margin: 0; font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif;
  color: var(--ink); background: var(--bg); }
header.top { padding: 18px 28px 10px; background: #1d2330; color: #fff; }
header.top h1 { margin: 0; font-size: 22px; }
header.top p { margin: 2px 0; color: #c8cedb; word-break: break-all; }
nav { position: sticky; top: 0; z-index: 5; padding: 8px 28px; background: #fff;
  border-bottom: 1px solid var(--line); display: flex; flex-wrap: wrap; gap: 6px 16px; }
nav a { color: #1f5fae; text-decoration: none; }
main { padding: 8px 28px 40px; }
section { margin-top: 22px; }
h2 { font-size: 18px; margin: 0 0 10px; }
.note { color: var(--muted); margin: 4px 0 10px; }
.warning { color: #8a5300; background: #fff5e0; border: 1px solid #f0d7a8; padding: 6px 10px;
  border-radius: 6px; }
.tiles { display: flex; flex-wrap: wrap; gap: 10px; margin: 0 0 14px; padding: 0; }
.tile { background: var(--card); border: 1px solid var(--line); border-radius: 8px;
  padding: 8px 14px; min-width: 130px; }
.tile dt { color: var(--muted); font-size: 12px; }
.tile dd { margin: 0; font-size: 20px; font-weight: 600; }
.tile.ok dd { color: var(--ok); } .tile.bad dd { color: var(--bad); }
table { border-collapse: collapse; background: var(--card); margin-bottom: 12px; }
th, td { border: 1px solid var(--line); padding: 4px 10px; text-align: left; vertical-align: top; }
th { background: #eef0f4; font-weight: 600; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
td.error { white-space: pre-wrap; word-break: break-word; max-width: 70ch; color: var(--bad);
  font-family: ui-monospace, monospace; font-size: 12px; }
.run { display: grid; grid-template-columns: max-content 1fr; gap: 2px 16px; }
.run dt { font-weight: 600; } .run dd { margin: 0; word-break: break-all; }
details > summary { cursor: pointer; color: #1f5fae; margin: 4px 0 8px; }
.cards { display: grid; grid-template-columns: repeat(auto-fill, minmax(410px, 1fr)); gap: 14px; }
.job { background: var(--card); border: 1px solid var(--line); border-radius: 8px;
  padding: 10px 12px; min-width: 0; }
.job header { display: flex; align-items: baseline; gap: 8px; }
.job h3 { margin: 0; font-size: 14px; word-break: break-all; flex: 1; }
.task { font-size: 12px; background: #e8ecf6; border-radius: 10px; padding: 0 8px; }
.metrics { display: flex; flex-wrap: wrap; gap: 2px 14px; margin: 4px 0 8px; font-size: 12px; }
.metrics div { display: flex; gap: 4px; } .metrics dt { color: var(--muted); }
.metrics dd { margin: 0; font-variant-numeric: tabular-nums; }
.images { display: flex; gap: 8px; align-items: flex-start; }
figure { margin: 0; text-align: center; }
figure img { display: block; height: var(--thumb); width: auto; max-width: 100%;
  border: 1px solid var(--line); background: #eee; }
figure img.exact { image-rendering: pixelated; }
figcaption { font-size: 11px; color: var(--muted); }
.missing { height: var(--thumb); width: var(--thumb); display: flex; align-items: center;
  justify-content: center; border: 1px dashed var(--line); color: var(--muted); font-size: 11px;
  padding: 4px; }
.plot svg { max-width: 100%; height: auto; }
.close, .job .full { display: none; }
.job:target { position: fixed; inset: 3vh 3vw; z-index: 20; overflow: auto; padding: 16px 20px;
  box-shadow: 0 0 0 100vmax rgba(10, 14, 22, 0.72); --thumb: min(62vh, 28vw); }
.job:target .close { display: inline; font-size: 26px; line-height: 1; text-decoration: none;
  color: var(--ink); }
.job:target .full { display: block; }
.job:target .images { justify-content: center; }
.job:target .plot { text-align: center; }
.job:target .plot svg { width: min(760px, 100%); }
"""
