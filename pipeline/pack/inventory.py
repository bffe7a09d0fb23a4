"""What one `featpipe pack` packs, and its file `DEST/listing.parquet`: the sorted, de-duplicated
entries (relative path and size) of a folder, prefix or list, written once per DEST so reruns and
every torchrun rank plan from it without walking SRC or fetching sizes again.

A source that grows is listed again (--relist) as a new generation: the entries not listed before
follow every earlier one, sorted among themselves, so shards already planned keep their files
(`grow`); entries that disappeared stay where they are, marked with the generation that noticed."""

from __future__ import annotations

import io
import itertools
import json
import re
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.chunks import read_parquet
from pipeline.listing import SourceFile
from pipeline.storage import Location, commit_bytes, locate

LISTING = "listing.parquet"
FORMAT = 2  # 2: generation and removed columns (a format-1 listing is one generation, nothing removed)
PRESENT = -1  # `removed` of an entry that is still there
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def is_absolute(name: str) -> bool:
    """A URL (scheme://…) or an absolute local path: not relative to any root."""
    return name.startswith("/") or ("://" in name and _SCHEME.match(name) is not None)


def encode_name(name: str) -> bytes:
    """A path as bytes: UTF-8, or the raw bytes of a name that is not (as Python decodes it)."""
    return name.encode("utf-8", "surrogateescape")


def decode_name(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")


@dataclass(frozen=True)
class Identity:
    """Where the entries came from. A rerun from another source is refused; a list whose bytes
    changed is planned again only when asked (--relist)."""

    source: str  # SRC as a URL or absolute path
    kind: str  # "folder" or "list"
    base: str | None  # what relative entries hang off (SRC for a folder, --root for a list), absolute
    shown: str | None  # the same as the user typed it: the start of each recorded path
    path_column: str | None = None
    size_column: str | None = None
    list_sha256: str | None = None

    def same_source(self, other: Identity) -> bool:
        """Same files, however SRC was spelled; a list's contents are compared apart."""
        fields = ("source", "kind", "base", "path_column", "size_column")
        return all(getattr(self, f) == getattr(other, f) for f in fields)


@dataclass(frozen=True)
class ListingStats:
    ignored: int = 0  # folder: files without an image extension
    blank_lines: int = 0  # list: lines with nothing on them
    duplicates: int = 0  # list: entries listed again (each packed once)
    duplicate_examples: tuple[str, ...] = ()


@dataclass(frozen=True)
class Missing:
    path: str
    reason: str


@dataclass
class Inventory:
    identity: Identity
    relpaths: pa.Array  # large_binary, sorted by bytes, unique
    sizes: np.ndarray  # int64, one per entry
    missing: list[Missing] = field(default_factory=list)  # listed, but not there when sizes were fetched
    stats: ListingStats = field(default_factory=ListingStats)
    generations: np.ndarray | None = None  # int32 per entry: the listing that added it (None: all 0)
    removed: np.ndarray | None = None  # int32 per entry: the listing that found it gone, or PRESENT

    def __post_init__(self) -> None:
        if self.generations is None:
            self.generations = np.zeros(len(self.relpaths), np.int32)
        if self.removed is None:
            self.removed = np.full(len(self.relpaths), PRESENT, np.int32)

    def __len__(self) -> int:
        return len(self.relpaths)

    @property
    def generation(self) -> int:
        """The newest listing this inventory holds."""
        return int(max(self.generations.max(initial=0), self.removed.max(initial=0)))

    def segments(self) -> list[tuple[int, int, int]]:
        """(generation, start, stop) of each generation's entries, in order: shards never span two."""
        cuts = [0, *(np.flatnonzero(np.diff(self.generations)) + 1).tolist(), len(self)]
        return [(int(self.generations[a]), a, b) for a, b in itertools.pairwise(cuts) if b > a]

    def resolver(self) -> Resolver:
        return Resolver.of(self.identity, self.relpaths)


@dataclass(frozen=True)
class Resolver:
    """Entry names → the paths a user recognises and the paths the filesystem opens."""

    location: Location  # one filesystem for the whole run
    base_shown: str | None  # the base as the user typed it

    @classmethod
    def of(cls, identity: Identity, relpaths: pa.Array) -> Resolver:
        if identity.base is not None:
            return cls(locate(identity.base), identity.shown)
        first = decode_name(relpaths[0].as_py()) if len(relpaths) else "/"
        return cls(locate(first), None)

    def files(self, relpaths: pa.Array, sizes: np.ndarray) -> tuple[SourceFile, ...]:
        return tuple(self.file(decode_name(r), int(s)) for r, s in zip(relpaths.to_pylist(), sizes, strict=True))

    def file(self, name: str, size: int) -> SourceFile:
        if is_absolute(name):
            return SourceFile(name, name, self.location.fs._strip_protocol(name), size)
        return SourceFile(name, f"{self.base_shown}/{name}", self.location.join(name), size)


def sort_unique(names: list[bytes], sizes: list[int]) -> tuple[pa.Array, np.ndarray, int, list[str]]:
    """Sorted by bytes (code-point order for UTF-8), each name once (its first listing kept):
    the names, their sizes, how many repeats were dropped, and the first few of them."""
    arr = pa.array(names, pa.large_binary())
    order = pc.sort_indices(arr)  # stable: a repeated name keeps its first listing's size
    arr = arr.take(order)
    size_arr = np.asarray(sizes, dtype=np.int64)[order.to_numpy()]
    if len(arr) < 2:
        return arr, size_arr, 0, []
    repeat = np.concatenate([[False], pc.equal(arr[1:], arr[:-1]).to_numpy(zero_copy_only=False)])
    if not repeat.any():
        return arr, size_arr, 0, []
    keep = ~repeat
    examples = sorted({decode_name(n) for n in arr.filter(pa.array(repeat))[:100].to_pylist()})[:10]
    return arr.filter(pa.array(keep)), size_arr[keep], int(repeat.sum()), examples


def grow(old: Inventory, new: Inventory) -> Inventory:
    """`new` (a fresh listing of the same source) as the next generation of `old`: entries that are
    not among old's present ones (same name and size) are appended, sorted among themselves; old's
    present entries that `new` lacks (or holds with another size: a file rewritten in place) are
    marked removed. Nothing added or removed: `old` itself, so a relist that finds no change
    changes nothing."""
    gen = old.generation + 1
    fresh = dict(zip(new.relpaths.to_pylist(), new.sizes.tolist(), strict=True))
    names = old.relpaths.to_pylist()
    present = old.removed == PRESENT
    kept = {n: s for n, s, p in zip(names, old.sizes.tolist(), present.tolist(), strict=True) if p}
    gone = np.array([p and fresh.get(n) != s for n, s, p in zip(names, old.sizes.tolist(), present, strict=True)])
    added = np.array([kept.get(n) != s for n, s in fresh.items()], bool)
    if not gone.any() and not added.any():
        return Inventory(new.identity, old.relpaths, old.sizes, new.missing, new.stats, old.generations, old.removed)
    removed = np.where(gone, gen, old.removed).astype(np.int32) if len(gone) else old.removed
    extra = new.relpaths.filter(pa.array(added))  # new's entries are sorted: so are these
    return Inventory(
        new.identity,
        pa.concat_arrays([old.relpaths, extra]),
        np.concatenate([old.sizes, new.sizes[added]]),
        new.missing,
        new.stats,
        np.concatenate([old.generations, np.full(int(added.sum()), gen, np.int32)]),
        np.concatenate([removed, np.full(int(added.sum()), PRESENT, np.int32)]),
    )


def write(dest: Location, inv: Inventory) -> None:
    """listing.parquet: the entries, then the missing ones (size -1, with the reason); where they
    came from and the counts in the file's metadata. Same entries → same bytes."""
    missing = pa.array([encode_name(m.path) for m in inv.missing], pa.large_binary())
    table = pa.table(
        {
            "relpath": pa.concat_arrays([inv.relpaths, missing]),
            "size": np.concatenate([inv.sizes, np.full(len(inv.missing), -1, np.int64)]),
            "problem": pa.array([None] * len(inv) + [valid_text(m.reason) for m in inv.missing], pa.string()),
            "generation": np.concatenate([inv.generations, np.full(len(inv.missing), inv.generation, np.int32)]),
            "removed": np.concatenate([inv.removed, np.full(len(inv.missing), PRESENT, np.int32)]),
        }
    )
    meta = {"format": FORMAT, "identity": vars(inv.identity), "stats": _stats_json(inv.stats)}
    table = table.replace_schema_metadata({"featpipe": json.dumps(meta, sort_keys=True)})
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    commit_bytes(dest.fs, dest.join(LISTING), buf.getvalue())


def valid_text(reason: str) -> str:
    """A reason as valid UTF-8: an OS error quoting a name that is not keeps it as \\udcXX escapes."""
    return reason.encode("utf-8", "backslashreplace").decode("utf-8")


def _stats_json(stats: ListingStats) -> dict:
    return {**vars(stats), "duplicate_examples": list(stats.duplicate_examples)}


def read_identity(dest: Location) -> Identity | None:
    path = dest.join(LISTING)
    if not dest.fs.exists(path):
        return None
    with dest.fs.open(path, "rb") as f:
        return Identity(**_meta(pq.read_schema(f))["identity"])


def read(dest: Location) -> Inventory:
    with dest.fs.open(dest.join(LISTING), "rb") as f:
        table = read_parquet(f)
    meta = _meta(table.schema)
    problem = table.column("problem").combine_chunks()
    ok = pc.is_null(problem)
    bad = table.filter(pc.invert(ok))
    good = table.filter(ok)
    stats = meta["stats"]
    grown = "generation" in table.column_names  # format 2
    return Inventory(
        Identity(**meta["identity"]),
        good.column("relpath").combine_chunks(),
        good.column("size").to_numpy(),
        _missing(bad),
        ListingStats(**{**stats, "duplicate_examples": tuple(stats["duplicate_examples"])}),
        good.column("generation").to_numpy().astype(np.int32) if grown else None,
        good.column("removed").to_numpy().astype(np.int32) if grown else None,
    )


def _missing(rows: pa.Table) -> list[Missing]:
    names, problems = rows.column("relpath").to_pylist(), rows.column("problem").to_pylist()
    return [Missing(decode_name(n), p) for n, p in zip(names, problems, strict=True)]


def _meta(schema: pa.Schema) -> dict:
    raw = (schema.metadata or {}).get(b"featpipe")
    if raw is None:
        raise ValueError(f"{LISTING} was not written by featpipe")
    return json.loads(raw)
