"""The inspector's stylesheet: inline in each page (no file to serve, nothing from a CDN).

Its SHA-256 is what the pages' Content-Security-Policy allows, so no other
style and no script at all can run on them.
"""

from __future__ import annotations

import base64
import hashlib

CSS = """
:root {
  --ink: #1f2933; --muted: #616e7c; --line: #d9e2ec; --bg: #f5f7fa; --card: #fff;
  --accent: #2f6fde; --cursor: #ffd54f; --cursor-line: #e08a00;
  --ok: #2e7d32; --ok-bg: #e3f4e4; --bad: #c62828; --bad-bg: #fde8e8;
  --warn: #8a5a00; --warn-bg: #fff3d6; --idle: #52606d; --idle-bg: #eef1f4;
  font-family: system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif;
  font-size: 14px; color: var(--ink); background: var(--bg);
}
* { box-sizing: border-box; }
body { margin: 0; }
a { color: var(--accent); text-decoration: none; }
a:hover { text-decoration: underline; }
code, pre, .mono { font-family: ui-monospace, "SFMono-Regular", Menlo, Consolas, monospace;
  font-size: 12.5px; }
header.top { display: flex; align-items: center; gap: 16px; padding: 10px 24px;
  background: #102a43; color: #fff; }
header.top .brand { color: #fff; font-weight: 650; font-size: 15px; letter-spacing: .2px; }
header.top .brand span { color: #9fb3c8; font-weight: 400; }
header.top .spacer { flex: 1; }
header.top form { margin: 0; }
header.top button { background: transparent; color: #d9e2ec; border: 1px solid #486581;
  border-radius: 6px; padding: 4px 10px; cursor: pointer; font: inherit; }
main { max-width: 1280px; margin: 0 auto; padding: 20px 24px 48px; }
h1 { font-size: 20px; margin: 4px 0 14px; display: flex; align-items: center; gap: 10px;
  flex-wrap: wrap; }
h1 .id { font-family: ui-monospace, Menlo, Consolas, monospace; word-break: break-all; }
h2 { font-size: 15px; margin: 0 0 10px; color: #334e68; }
.card { background: var(--card); border: 1px solid var(--line); border-radius: 10px;
  padding: 16px 18px; margin-bottom: 16px; }
.muted { color: var(--muted); }
.crumbs { margin: 0 0 6px; }
.grid { display: grid; grid-template-columns: minmax(0, 1fr) minmax(0, 1fr); gap: 16px;
  margin-bottom: 16px; }
.grid > .card { margin-bottom: 0; }
.stack { display: flex; flex-direction: column; gap: 16px; }
@media (max-width: 900px) { .grid { grid-template-columns: 1fr; } }

form.filters { display: flex; flex-wrap: wrap; gap: 12px; align-items: flex-end; }
form.filters label { display: flex; flex-direction: column; gap: 4px; color: var(--muted);
  font-size: 12px; }
input, select { font: inherit; padding: 6px 8px; border: 1px solid #bcccdc;
  border-radius: 6px; background: #fff; color: var(--ink); min-width: 120px; }
button.primary { font: inherit; background: var(--accent); color: #fff; border: 0;
  border-radius: 6px; padding: 7px 14px; cursor: pointer; }
.filters a { padding: 7px 4px; }

table { border-collapse: collapse; width: 100%; }
th { text-align: left; font-weight: 600; color: var(--muted); font-size: 12px;
  border-bottom: 1px solid var(--line); padding: 6px 8px; white-space: nowrap; }
td { border-bottom: 1px solid #edf1f5; padding: 7px 8px; vertical-align: top; }
tr:last-child td { border-bottom: 0; }
td.empty { color: var(--muted); text-align: center; padding: 24px; }
td.id a { font-family: ui-monospace, Menlo, Consolas, monospace; word-break: break-all; }
td.json { max-width: 360px; }
td.json code { white-space: pre-wrap; word-break: break-word; }
.count { color: var(--muted); margin: 10px 2px 0; }
nav.pager { display: flex; gap: 16px; margin-top: 12px; }

.badge { display: inline-block; border-radius: 999px; padding: 2px 10px; font-size: 12px;
  font-weight: 600; background: var(--idle-bg); color: var(--idle); }
.badge.s-waiting { background: #e0ecff; color: #1c4fb8; }
.badge.s-resuming, .badge.s-retrying { background: var(--warn-bg); color: var(--warn); }
.badge.s-failed { background: var(--bad-bg); color: var(--bad); }
.badge.s-finished { background: var(--ok-bg); color: var(--ok); }
.badge.k-started, .badge.k-finished { background: var(--ok-bg); color: var(--ok); }
.badge.k-event { background: #e0ecff; color: #1c4fb8; }
.badge.k-timer { background: #f3e8ff; color: #6b21a8; }
.badge.k-failed, .badge.k-cancelled { background: var(--bad-bg); color: var(--bad); }

dl.facts { display: grid; grid-template-columns: max-content 1fr; gap: 6px 18px; margin: 0; }
dl.facts dt { color: var(--muted); }
dl.facts dd { margin: 0; word-break: break-word; }
.problem { background: var(--bad-bg); color: var(--bad); border-radius: 8px; padding: 10px 12px;
  margin: 0 0 10px; white-space: pre-wrap; word-break: break-word; }
pre.json { background: #f8fafc; border: 1px solid #edf1f5; border-radius: 8px; padding: 10px 12px;
  margin: 0; overflow: auto; max-height: 480px; white-space: pre-wrap; word-break: break-word; }
details summary { cursor: pointer; color: var(--accent); }
ul.fields { margin: 4px 0; padding-left: 18px; }
.req { color: var(--bad); }

/* the diagram */
.diagram-wrap { overflow: auto; padding: 6px 2px 4px; }
.legend { display: flex; gap: 14px; flex-wrap: wrap; color: var(--muted); font-size: 12px;
  margin-bottom: 10px; }
.legend i { display: inline-block; width: 12px; height: 12px; border-radius: 3px;
  vertical-align: -2px; margin-right: 5px; border: 1px solid #9aa5b1; }
.legend i.cursor { background: var(--cursor); border: 2px solid var(--cursor-line); }
.legend i.done { background: var(--ok-bg); border-color: var(--ok); }
.legend i.failed { background: var(--bad-bg); border-color: var(--bad); }
.diagram { display: flex; gap: 24px; align-items: flex-start; min-width: min-content; }
.flow { display: flex; flex-direction: column; align-items: center; }
.flow.root { margin: 0 auto; }
.link { width: 2px; height: 16px; background: #9aa5b1; position: relative; flex: none; }
.link::after { content: ""; position: absolute; bottom: -1px; left: -4px;
  border: 5px solid transparent; border-top: 6px solid #9aa5b1; border-bottom: 0; }
.flow.empty .link { height: 22px; }
.node { border: 1.5px solid #7b8794; background: #fff; border-radius: 6px; padding: 6px 12px;
  max-width: 280px; text-align: center; line-height: 1.3; position: relative; }
.node .icon { color: var(--muted); margin-right: 5px; }
.node.k-start, .node.k-end, .node.k-return { border-radius: 999px; background: var(--idle-bg);
  font-size: 12px; padding: 4px 14px; }
.node.k-step { border-color: #486581; }
.node.k-select { border-color: #1c4fb8; background: #f0f5ff; border-radius: 14px; }
.node.k-if, .node.k-switch { border-color: #b7791f; background: #fffaf0; border-radius: 14px;
  font-size: 12px; }
.node.k-for { border-color: #6b21a8; background: #faf5ff; transform: skewX(-8deg); }
.node.k-for > * { display: inline-block; transform: skewX(8deg); }
.node.k-wait { border-color: #0f766e; background: #f0fdfa; border-radius: 14px; }
.node.k-go, .node.k-fork, .node.k-join { border-color: #52606d; background: #f5f7fa;
  font-size: 12px; }
.node.k-jump { border-style: dashed; font-size: 12px; }
.node.k-missing { border-style: dashed; border-color: var(--bad); background: var(--bad-bg); }
.node.done, .title.done { background: var(--ok-bg); border-color: var(--ok); }
.node.failed, .title.failed { background: var(--bad-bg); border-color: var(--bad); }
.node.skipped, .title.skipped { background: #eeeeee; border-color: #9e9e9e; border-style: dashed; }
.node.cursor, .title.cursor { background: var(--cursor); border: 3px solid var(--cursor-line);
  box-shadow: 0 0 0 4px rgba(255, 213, 79, .35); font-weight: 600; }
ul.notes { list-style: none; margin: 4px 0 0; padding: 4px 0 0; border-top: 1px dashed #c9a227;
  font-size: 11.5px; font-weight: 400; text-align: left; }
ul.notes li { margin: 1px 0; }
.split { display: flex; flex-direction: column; align-items: center; }
.branches { display: flex; gap: 18px; align-items: flex-start; justify-content: center;
  margin-top: 0; padding-top: 8px; border-top: 2px solid #cbd2d9; }
.branch, .lane { display: flex; flex-direction: column; align-items: center; }
.edge { font-size: 11.5px; color: var(--muted); background: #fff; border: 1px solid var(--line);
  border-radius: 4px; padding: 1px 6px; margin: 2px 0 0; max-width: 220px; text-align: center; }
.box { border: 1.5px dashed #bcccdc; border-radius: 10px; padding: 8px 10px 10px;
  display: flex; flex-direction: column; align-items: center; background: rgba(255,255,255,.6); }
.box .title { font-size: 12px; color: #334e68; font-weight: 600; padding: 2px 8px;
  border-radius: 6px; border: 1.5px solid transparent; text-align: center; }
.box .title .after { display: block; font-weight: 400; color: var(--muted); font-size: 11px; }
.box.loop { border-color: #d6bcfa; }
.box.thread { border-color: #9fb3c8; }
.box.dag { border-color: #9fb3c8; border-style: solid; }
.box.lost { border-color: var(--bad); }
.back { font-size: 11.5px; color: #6b21a8; margin-top: 6px; }
.spawn { display: flex; gap: 14px; align-items: flex-start; }
.flow.layers { gap: 0; }

.login { max-width: 420px; margin: 60px auto; }
.login form { display: flex; flex-direction: column; gap: 10px; }
.login input { width: 100%; }
.login p { color: var(--muted); line-height: 1.5; }
"""

CSS_HASH = "sha256-" + base64.b64encode(hashlib.sha256(CSS.encode("utf-8")).digest()).decode()
"""The Content-Security-Policy source of the one ``<style>`` element the pages carry."""
