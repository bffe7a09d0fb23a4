"""`featpipe show MATCH_OR_DEDUP page.html`: static, self-contained HTML pages to look at the
neighbours of a sample of queries, or at duplicate groups. Thumbnails are small JPEGs inlined as
data URIs (read from the shards, or from the source files in folder mode), so a page opens from a
file, offline, and carries no local path a browser would fetch; every path and key is escaped.
Pages hold a bounded number of items, linked page to page, so each stays light.
"""

from __future__ import annotations

import base64
import hashlib
import html
import io
import logging
import os
import posixpath
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from pipeline.errors import UserError
from pipeline.outdir import load_run
from pipeline.readmany import read_many
from pipeline.retrieve.byrow import row_places
from pipeline.retrieve.features import FeatureSet, features_exist, open_features
from pipeline.retrieve.knn import NO_MATCH
from pipeline.retrieve.rowmeta import RowPlace
from pipeline.shardformat import tar_members
from pipeline.storage import PIPE, commit_bytes, ensure_writable, locate, open_stream, read_valid_json

log = logging.getLogger("featpipe")
PER_PAGE = 25  # queries or groups per page: 25 × 11 thumbnails of 128 px are ~1 MB
MAX_MEMBERS = 48  # thumbnails shown per duplicate group


@dataclass(frozen=True)
class Tile:
    row: int
    badge: str = ""


@dataclass(frozen=True)
class Item:
    title: str
    tiles: list[Tile]


def run_show(source: str, page: str, sample: int = 100, thumb: int = 128, per_page: int = PER_PAGE) -> list[str]:
    """Writes page.html (and page-2.html, …); returns their paths."""
    source, page = os.fspath(source), os.fspath(page)
    if not 16 <= thumb <= 1024:
        raise UserError(f"--thumb must be between 16 and 1024 pixels, got {thumb}")
    for flag, value in (("--sample", sample), ("--per-page", per_page)):
        if value < 1:
            raise UserError(f"{flag} must be at least 1, got {value}")
    _check_page(page)
    kind, report = _kind(source)
    fs = _features(report)
    items = _match_items(source, fs, sample) if kind == "match" else _dedup_items(source, fs, sample)
    folder = os.path.dirname(os.path.abspath(page))
    ensure_writable(locate(folder))  # an unwritable target is one line before any work is done
    places = row_places(fs, {t.row for it in items for t in it.tiles})  # these rows' names alone, not every row's
    thumbs = Thumbnails(fs, thumb, lambda rows: {r: places[r] for r in rows}).make(set(places))
    chunks = [items[i : i + per_page] for i in range(0, len(items), per_page)] or [[]]
    names = [_page_name(page, i) for i in range(len(chunks))]
    heading = f"featpipe {kind}: {source}"
    for i, chunk in enumerate(chunks):
        body = _render(heading, chunk, thumbs, places, names, i, thumb)
        commit_bytes(locate(folder).fs, os.path.join(folder, os.path.basename(names[i])), body.encode())
    return [os.path.join(folder, os.path.basename(n)) for n in names]


def _check_page(page: str) -> None:
    """PAGE is an .html file to write, never a folder (`dir/` once wrote a hidden `.html` beside
    it) nor one of the results it shows (`mm/match.json` once replaced the match's report)."""
    name = os.path.basename(page)
    if not name.lower().endswith((".html", ".htm")) or name.startswith(".") or os.path.isdir(page):
        raise UserError(f"PAGE {page!r} must be a file name ending in .html (e.g. page.html), not a folder")


def _kind(source: str) -> tuple[str, dict]:
    remedy = "run featpipe match (or dedup) into it again"
    loc = locate(source)
    for kind, name in (("dedup", "dedup.json"), ("match", "match.json")):
        if loc.fs.isfile(loc.join(name)):
            report = read_valid_json(loc.fs, loc.join(name), remedy)
            if kind == "dedup":
                report = {**report, **read_valid_json(loc.fs, loc.join("match.json"), remedy)}
            return kind, report
    raise UserError(f"{source} is not the output of `featpipe match` or `featpipe dedup` (no match.json)")


def _features(report: dict) -> FeatureSet | None:
    path = report.get("features")
    if not path or not features_exist(path):
        return None
    fs = open_features(path)
    if fs.fingerprint != report.get("features_fingerprint"):
        raise UserError(f"the features at {path} changed since this match was made; run the match again")
    none_removed = hashlib.sha256(b"").hexdigest()  # a match made before featpipe recorded removals
    if report.get("removed", {}).get("sha256", none_removed) != fs.removed_digest["sha256"]:
        raise UserError(f"rows of {path} were removed since this match was made; run it again with --update")
    return fs


def _sample(rows: np.ndarray, sample: int) -> np.ndarray:
    if len(rows) <= sample:
        return rows
    return np.sort(np.random.default_rng(0).choice(rows, sample, replace=False))


def _match_items(source: str, fs: FeatureSet | None, sample: int) -> list[Item]:
    from pipeline.retrieve.match import load_neighbors

    matches, scores = load_neighbors(locate(source))
    queries = _sample(np.flatnonzero(matches[:, 0] != NO_MATCH), sample)
    items = []
    for q in queries:
        tiles = [Tile(int(q), "query")]
        for m, s in zip(matches[q], scores[q], strict=True):
            if m != NO_MATCH and m != q:
                tiles.append(Tile(int(m), f"{s:.4f}"))
        items.append(Item(f"row {q}", tiles))
    return items


def _dedup_items(source: str, fs: FeatureSet | None, sample: int) -> list[Item]:
    loc = locate(source)
    groups = read_valid_json(loc.fs, loc.join("groups.json"), "run featpipe dedup again")
    groups = sorted(groups, key=lambda g: (-len(g["members"]), g["representative"]))[:sample]
    items = []
    for g in groups:
        tiles = [
            Tile(m, "representative" if m == g["representative"] else f"{s:.4f}")
            for m, s in list(zip(g["members"], g["scores"], strict=True))[:MAX_MEMBERS]
        ]
        more = len(g["members"]) - len(tiles)
        items.append(Item(f"group of {len(g['members'])}" + (f" ({more} not shown)" if more > 0 else ""), tiles))
    return items


class Thumbnails:
    """Small JPEGs (as bytes, or as data URIs for a page), read once per shard (tar shards) or per
    file (folder mode)."""

    def __init__(self, fs: FeatureSet | None, size: int, places: Callable[[list[int]], dict] | None = None):
        """`places`: rows → RowPlace read by row (an index's rows/, so a service never loads the
        lists of every row's shard, key and path); without it, those lists from FEATURES."""
        self.fs, self.size, self._places = fs, size, places

    def places(self, rows: list[int]) -> dict[int, RowPlace]:
        return self._places(rows) if self._places is not None else row_places(self.fs, rows)

    def make(self, rows: set[int]) -> dict[int, str]:
        return {r: "data:image/jpeg;base64," + base64.b64encode(j).decode() for r, j in self.jpegs(rows).items()}

    def jpegs(self, rows: set[int]) -> dict[int, bytes]:
        fs = self.fs
        if fs is None or fs.folder is None:
            return {}
        urls = {s.name: s.url for s in load_run(locate(fs.folder)).shards}
        places = self.places(sorted(rows))
        if any(p.shard is None for p in places.values()):  # chunks of a featpipe before shards were recorded
            return {}
        wanted: dict[str, dict[str, int]] = {}
        for r, place in places.items():
            wanted.setdefault(place.shard, {})[place.key] = r
        out: dict[int, bytes] = {}
        for shard, keys in sorted(wanted.items()):
            try:
                out |= self._from_shard(urls[shard], keys, places)
            except (UserError, OSError) as exc:  # a shard gone or out of reach: its tiles show no picture
                log.debug("no thumbnails from %s: %s", urls[shard], exc)
        return {r: jpeg for r, jpeg in out.items() if jpeg}

    def _from_shard(self, url: str, keys: dict[str, int], places: dict[int, RowPlace]) -> dict[int, bytes]:
        if url.endswith(".tar") and not url.startswith(PIPE) and all(places[r].offset >= 0 for r in keys.values()):
            return self._by_range(url, {r: (places[r].offset, places[r].length) for r in keys.values()})
        if url.endswith((".tar", ".tgz", ".tar.gz")):
            return self._from_tar(url, keys)
        ordered = sorted(keys.values())  # folder mode: the sample's path is the source file, many reads in flight
        return {
            ordered[i]: b"" if isinstance(data, BaseException) else self._encode(data)
            for i, data in read_many(locate(url).fs, [places[r].path for r in ordered])
        }

    def _by_range(self, url: str, where: dict[int, tuple[int, int]]) -> dict[int, bytes]:
        """Each image read alone by the byte range its chunk recorded: a thumbnail of a 177 MB shard
        reads its ~100 KB, on a disk or a bucket (one ranged GET), not the shard up to it."""
        loc = locate(url)
        found: dict[int, bytes] = {}
        for row, (offset, length) in sorted(where.items()):
            try:
                data = loc.fs.cat_file(loc.path, start=offset, end=offset + length)
            except Exception:  # a shard gone or rewritten since extraction: that tile shows no picture
                continue
            found[row] = self._encode(data)
        return found

    def _from_tar(self, url: str, keys: dict[str, int]) -> dict[int, bytes]:
        from webdataset.tariterators import base_plus_ext

        from pipeline.image.header import IMAGE_EXTENSIONS

        found: dict[int, bytes] = {}
        try:
            with open_stream(url) as stream:
                for member in tar_members(stream):
                    key, ext = base_plus_ext(member["fname"])
                    if key in keys and ext and ext.lower() in IMAGE_EXTENSIONS:
                        found[keys[key]] = self._encode(member["data"])
                        if len(found) == len(keys):
                            break
        except Exception:  # a shard gone or damaged since extraction: those tiles show no picture
            pass
        return found

    def _encode(self, data: bytes) -> bytes:
        """A thumbnail JPEG, or b"" when the image cannot be read."""
        from pipeline.image.decode import load_first_frame, upright
        from pipeline.image.header import open_lazy

        try:
            im = upright(load_first_frame(open_lazy(data), self.size)).convert("RGB")
            im.thumbnail((self.size, self.size))
            buf = io.BytesIO()
            im.save(buf, "JPEG", quality=75)
        except Exception:
            return b""
        return buf.getvalue()


def _page_name(page: str, i: int) -> str:
    stem, ext = posixpath.splitext(os.path.basename(page))
    return f"{stem}{'' if i == 0 else f'-{i + 1}'}{ext or '.html'}"


STYLE = """body{font:14px system-ui,sans-serif;margin:1.5em;color:#222;background:#fafafa}
h1{font-size:18px}h2{font-size:15px;margin:1.2em 0 .4em}
.row{display:flex;flex-wrap:wrap;gap:8px;padding:8px;background:#fff;border:1px solid #ddd;border-radius:6px}
figure{margin:0;width:%(w)dpx}figure img,figure .none{width:%(w)dpx;height:%(w)dpx;object-fit:contain;background:#eee}
figure .none{display:flex;align-items:center;justify-content:center;color:#888}
figcaption{font-size:11px;overflow-wrap:anywhere;max-height:6em;overflow:hidden}figcaption i{display:block;color:#444}
.badge{font-weight:600}.query .badge,.representative .badge{color:#b50}nav{margin:1em 0}"""


def _render(
    heading: str,
    items: list[Item],
    thumbs: dict[int, str],
    places: dict[int, RowPlace],
    names: list[str],
    page: int,
    size: int,
) -> str:
    e = lambda s: html.escape(str(s), quote=True)  # every text and attribute goes through it
    nav = " · ".join(f"<b>{i + 1}</b>" if i == page else f'<a href="{e(n)}">{i + 1}</a>' for i, n in enumerate(names))
    parts = [
        f"<!doctype html><html lang=en><head><meta charset=utf-8><title>{e(heading)}</title>",
        f"<style>{STYLE % {'w': size}}</style></head><body><h1>{e(heading)}</h1>",
        f"<nav>page {nav}</nav>",
    ]
    for item in items:
        parts.append(f"<h2>{e(item.title)}</h2><div class=row>")
        for t in item.tiles:
            place = places[t.row]
            name = place.path or f"row {t.row}"
            key = f" · {place.key}" if place.key else ""
            img = (
                f'<img src="{thumbs[t.row]}" alt="{e(place.caption or name)}" width={size} height={size}>'
                if t.row in thumbs
                else "<div class=none>no picture</div>"
            )
            cls = t.badge if t.badge in ("query", "representative") else "neighbour"
            parts.append(
                f'<figure class="{cls}" title="{e(name)}">{img}<figcaption><span class=badge>'
                f"{e(t.badge)}</span> {e(name.rsplit('/', 1)[-1])} <small>(row {t.row}{e(key)})</small>"
                + (f"<i>{e(place.caption)}</i>" if place.caption else "")  # the sample's own caption (.txt)
                + "</figcaption></figure>"
            )
        parts.append("</div>")
    parts.append(f"<nav>page {nav}</nav></body></html>\n")
    return "".join(parts)


def summary(pages: list[str]) -> str:
    return f"{len(pages)} page{'s' if len(pages) != 1 else ''}: {pages[0]}" + (
        f" … {os.path.basename(pages[-1])}" if len(pages) > 1 else ""
    )
