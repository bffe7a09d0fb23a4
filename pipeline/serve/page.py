"""The service's one page: pick, drop or paste an image (or type a text, key or path), see the
neighbours as a grid, page through them, click one to search by it; the current query is shown
above the grid, and a row, key or text query lives in the URL's fragment so it can be shared. While
the service loads, the page asks again every second. Self-contained: no build step, no CDN.
Everything that comes from the index is put in the page as text (textContent), never as HTML."""

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>featpipe</title>
<meta name="viewport" content="width=device-width, initial-scale=1"><link rel="icon" href="data:,">
<style>
body{font:14px system-ui,sans-serif;margin:1.2em;color:#222;background:#fafafa}
h1{font-size:18px;margin:0 0 .3em}#info,#status{color:#555;margin:.3em 0}
#drop{border:2px dashed #aaa;border-radius:8px;padding:1em;text-align:center;background:#fff;margin:.6em 0}
#drop.over{border-color:#b50;background:#fff7ef}
form{display:flex;gap:.5em;margin:.6em 0}input[type=text]{flex:1;padding:.4em}
#grid{display:flex;flex-wrap:wrap;gap:10px}
figure{margin:0;width:170px;background:#fff;border:1px solid #ddd;border-radius:6px;padding:5px;cursor:pointer}
figure img{width:160px;height:160px;object-fit:contain;background:#eee;display:block}
figcaption{font-size:11px;overflow-wrap:anywhere}.score{font-weight:600}.caption{color:#444;font-style:italic}
#status.error{color:#b00}#query{display:flex;align-items:center;gap:.6em;margin:.4em 0}
#query img{width:64px;height:64px;object-fit:contain;background:#eee}#pager{margin:.8em 0}
</style></head><body>
<h1>featpipe</h1><div id="info">loading…</div>
<div id="drop">Drop an image here, paste one, or <input type="file" id="file" accept="image/*"></div>
<form id="form"><input type="text" id="q" placeholder="text (CLIP-style models), or a key or path in the index">
<button type="submit" id="by-text">text</button><button type="button" id="by-key">key / path</button></form>
<div id="query"><img id="query-img" alt=""><span id="query-text"></span></div>
<div id="status"></div><div id="grid"></div>
<nav id="pager"><button type="button" id="prev">previous</button> <span id="page"></span>
<button type="button" id="next">next</button></nav>
<script>
const $ = (id) => document.getElementById(id);
let info = null;
let current = null;  // {kind, value, file, offset}: what the grid shows, so it can be paged
const pageSize = () => (info && info.limits ? info.limits.default_k : 10);
function status(text, error) { const s = $("status"); s.textContent = text; s.className = error ? "error" : ""; }
async function call(url, options) {
  const t0 = performance.now();
  const r = await fetch(url, options);
  const body = await r.json().catch(() => ({error: {message: "HTTP " + r.status}}));
  if (!r.ok) { status(body.error ? body.error.message : "HTTP " + r.status, true); return null; }
  status(body.hits.length + " results in " + Math.round(performance.now() - t0) + " ms");
  return body.hits;
}
function showQuery() {
  const img = $("query-img"), text = $("query-text");
  if (!current) { $("query").hidden = true; return; }
  $("query").hidden = false;
  if (current.file) { img.src = URL.createObjectURL(current.file); img.hidden = false; }
  else if (current.kind === "row") { img.src = "/api/thumb/" + encodeURIComponent(current.value); img.hidden = false; }
  else { img.removeAttribute("src"); img.hidden = true; }
  const what = current.file ? "the image " + (current.file.name || "pasted") : current.kind + " " + current.value;
  text.textContent = "query: " + what;
}
function show(hits) {
  const grid = $("grid"); grid.replaceChildren();
  $("prev").disabled = !current || current.offset === 0;
  $("next").disabled = !hits || hits.length < pageSize();
  const first = current ? current.offset + 1 : 0;
  $("page").textContent = current && hits ? "results " + first + "–" + (first + hits.length - 1) : "";
  if (!hits) return;
  for (const h of hits) {
    const fig = document.createElement("figure");
    fig.dataset.row = h.row;
    const img = document.createElement("img");
    img.src = h.thumb; img.alt = h.path || h.key || ("row " + h.row);
    const cap = document.createElement("figcaption");
    const score = document.createElement("span"); score.className = "score"; score.textContent = h.score.toFixed(4);
    const name = document.createElement("div"); name.textContent = (h.path || h.key || "row " + h.row);
    cap.append(score, " · #" + h.rank + " · row " + h.row, name);
    if (h.caption) {  // the sample's own caption (img2dataset's .txt), as text: never markup
      const said = document.createElement("div"); said.className = "caption"; said.textContent = h.caption;
      cap.append(said); img.alt = h.caption;
    }
    fig.append(img, cap);
    fig.addEventListener("click", () => { location.hash = "row=" + h.row; });
    grid.append(fig);
  }
}
async function run() {
  showQuery(); status("searching…");
  const paging = {k: pageSize(), offset: current.offset};
  if (current.file) {
    const form = new FormData(); form.append("image", current.file);
    show(await call("/api/search?" + new URLSearchParams(paging), {method: "POST", body: form}));
  } else {
    show(await call("/api/search?" + new URLSearchParams({[current.kind]: current.value, ...paging})));
  }
}
function byImage(file) {
  if (!file) return;
  history.replaceState(null, "", location.pathname);
  current = {kind: "image", file: file, offset: 0};
  run();
}
function fromHash() {
  const p = new URLSearchParams(location.hash.slice(1));
  for (const kind of ["row", "key", "text"]) {
    if (p.has(kind)) {
      $("file").value = "";  // the file input no longer names the query
      if (kind !== "row") $("q").value = p.get(kind);
      current = {kind: kind, value: p.get(kind), offset: Number(p.get("offset")) || 0};
      run(); return;
    }
  }
}
function page(step) {
  if (!current) return;
  current.offset = Math.max(0, current.offset + step * pageSize());
  if (current.file) { run(); return; }
  history.replaceState(null, "", "#" + new URLSearchParams({[current.kind]: current.value, offset: current.offset}));
  run();
}
$("prev").addEventListener("click", () => page(-1));
$("next").addEventListener("click", () => page(1));
$("file").addEventListener("change", (e) => byImage(e.target.files[0]));
const drop = $("drop");
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => {
  e.preventDefault(); drop.classList.remove("over"); byImage(e.dataTransfer.files[0]);
});
document.addEventListener("paste", (e) => {
  for (const item of e.clipboardData.items) if (item.type.startsWith("image/")) { byImage(item.getAsFile()); break; }
});
const searchKey = () => { location.hash = "key=" + encodeURIComponent($("q").value); };
function submitQuery() {
  // a text search where the model has a text tower, else a key or path lookup
  if ($("by-text").disabled) { searchKey(); return; }
  location.hash = "text=" + encodeURIComponent($("q").value);
}
$("form").addEventListener("submit", (e) => { e.preventDefault(); submitQuery(); });
// Enter in the box: a form whose default button is disabled never submits, so the key is heard here
$("q").addEventListener("keydown", (e) => { if (e.key === "Enter") { e.preventDefault(); submitQuery(); } });
$("by-key").addEventListener("click", searchKey);
window.addEventListener("hashchange", fromHash);
async function load() {
  // The service answers 503 while it loads: ask again until it is ready, then search what the URL says
  let i;
  try { const r = await fetch("/api/info"); i = await r.json(); } catch (err) { i = {error: {message: String(err)}}; }
  if (i.error) { $("info").textContent = i.error.message + " (retrying)"; setTimeout(load, 1000); return; }
  info = i;
  const text = i.text_queries ? " · text search on" : "";
  $("info").textContent = i.n + " images · " + i.dim + "-dim · " + i.index + text;
  $("by-text").disabled = !i.text_queries;
  $("q").placeholder = i.text_queries ? "text, or a key or path in the index" : "a key or path in the index (Enter)";
  fromHash();
}
showQuery(); $("prev").disabled = $("next").disabled = true;
load();
</script></body></html>
"""
