"""The service's one page: pick, drop or paste an image (or type a text, key or path), see the
neighbours as a grid, click one to search by it; the query lives in the URL's fragment so a search
can be shared. Self-contained: no build step, no CDN. Everything that comes from the index is put
in the page as text (textContent), never as HTML."""

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
figcaption{font-size:11px;overflow-wrap:anywhere}.score{font-weight:600}
#status.error{color:#b00}
</style></head><body>
<h1>featpipe</h1><div id="info">loading…</div>
<div id="drop">Drop an image here, paste one, or <input type="file" id="file" accept="image/*"></div>
<form id="form"><input type="text" id="q" placeholder="text (CLIP-style models), or a key or path in the index">
<button type="submit" id="by-text">text</button><button type="button" id="by-key">key / path</button></form>
<div id="status"></div><div id="grid"></div>
<script>
const $ = (id) => document.getElementById(id);
let info = null;
function status(text, error) { const s = $("status"); s.textContent = text; s.className = error ? "error" : ""; }
async function call(url, options) {
  const t0 = performance.now();
  const r = await fetch(url, options);
  const body = await r.json().catch(() => ({error: {message: "HTTP " + r.status}}));
  if (!r.ok) { status(body.error ? body.error.message : "HTTP " + r.status, true); return null; }
  status(body.hits.length + " results in " + Math.round(performance.now() - t0) + " ms");
  return body.hits;
}
function show(hits) {
  const grid = $("grid"); grid.replaceChildren();
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
    fig.append(img, cap);
    fig.addEventListener("click", () => { location.hash = "row=" + h.row; });
    grid.append(fig);
  }
}
async function byImage(file) {
  if (!file) return;
  const form = new FormData(); form.append("image", file);
  history.replaceState(null, "", location.pathname);
  status("searching…");
  show(await call("/api/search", {method: "POST", body: form}));
}
async function fromHash() {
  const p = new URLSearchParams(location.hash.slice(1));
  for (const kind of ["row", "key", "text"]) {
    if (p.has(kind)) { if (kind !== "row") $("q").value = p.get(kind); status("searching…");
      show(await call("/api/search?" + new URLSearchParams({[kind]: p.get(kind)}))); return; }
  }
}
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
$("form").addEventListener("submit", (e) => {
  e.preventDefault(); location.hash = "text=" + encodeURIComponent($("q").value);
});
$("by-key").addEventListener("click", () => { location.hash = "key=" + encodeURIComponent($("q").value); });
window.addEventListener("hashchange", fromHash);
fetch("/api/info").then((r) => r.json()).then((i) => {
  if (i.error) { $("info").textContent = i.error.message; return; }
  info = i;
  const text = i.text_queries ? " · text search on" : "";
  $("info").textContent = i.n + " images · " + i.dim + "-dim · " + i.index + text;
  $("by-text").disabled = !i.text_queries;
  fromHash();
});
</script></body></html>
"""
