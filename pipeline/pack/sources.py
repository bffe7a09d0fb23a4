"""SRC → an Inventory: the images under a folder or bucket prefix (one recursive walk), or the
entries of a list the user already has: a text file of paths or URLs (one a line), or a CSV /
Parquet file with a path column and, optionally, a size column (sizes are fetched only where missing).
Every problem with the list itself is one line before anything is written; files that are listed
but not there are recorded (the manifest's skipped list), and the run goes on."""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import os
import posixpath
import stat
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from pipeline.errors import UserError, first_line, reason
from pipeline.image.header import has_image_extension
from pipeline.listing import list_images
from pipeline.pack.inventory import (
    Identity,
    Inventory,
    ListingStats,
    Missing,
    decode_name,
    encode_name,
    is_absolute,
    sort_unique,
    valid_text,
)
from pipeline.storage import locate, retrying

UNKNOWN = -1  # a size the list did not give
SIZE_THREADS = 32  # concurrent size lookups against an object store (each is one HEAD request)


@dataclass(frozen=True)
class SourceSpec:
    """How SRC is read: the settings that decide which entries there are."""

    src: str
    root: str | None = None  # what a list's relative entries are relative to
    path_column: str = "path"
    size_column: str = "size"


def source_kind(spec: SourceSpec) -> str:
    """'folder' or 'list', or one line saying why SRC is neither."""
    loc = locate(spec.src)
    try:
        if loc.fs.isdir(loc.path):
            if spec.root is not None:
                raise UserError(f"--root is for a list of paths; {spec.src} is a folder (drop --root)")
            return "folder"
        exists = loc.fs.exists(loc.path)
    except UserError:
        raise
    except Exception as exc:  # every backend raises its own type
        raise UserError(f"cannot read source {spec.src}: {first_line(exc)}") from None
    if not exists:
        raise UserError(f"source {spec.src} does not exist")
    if has_image_extension(spec.src):
        raise UserError(
            f"source {spec.src} is an image file; give the folder or prefix that holds the images, "
            "or a list of them (.txt, .csv, .tsv, .parquet)"
        )
    return "list"


def identity(spec: SourceSpec, kind: str, list_bytes: bytes | None = None) -> Identity:
    loc = locate(spec.src)
    if kind == "folder":
        return Identity(loc.url(), kind, loc.url(), spec.src.rstrip("/"))
    return Identity(
        loc.url(),
        kind,
        locate(spec.root).url() if spec.root else None,
        spec.root.rstrip("/") if spec.root else None,
        spec.path_column,
        spec.size_column,
        hashlib.sha256(list_bytes).hexdigest() if list_bytes is not None else None,
    )


def read_list_bytes(spec: SourceSpec) -> bytes:
    loc = locate(spec.src)
    try:
        return loc.fs.cat_file(loc.path)
    except Exception as exc:
        raise UserError(f"cannot read list {spec.src}: {first_line(exc)}") from None


def from_folder(spec: SourceSpec, exclude: str | None) -> Inventory:
    listing = list_images(spec.src, exclude=exclude)
    names = [encode_name(f.relpath) for f in listing.files]
    relpaths, sizes, _, _ = sort_unique(names, [f.size for f in listing.files])
    return Inventory(identity(spec, "folder"), relpaths, sizes, [], ListingStats(ignored=listing.ignored))


def from_list(spec: SourceSpec, data: bytes) -> Inventory:
    raw, sizes, where, blank = _parse(spec, data)
    if not raw:
        raise UserError(f"list {spec.src} has no entries")
    _check_filesystem(spec, raw, where)
    relpaths, size_arr, repeats, examples = sort_unique(_normalise(spec, raw, where), sizes)
    stats = ListingStats(blank_lines=blank, duplicates=repeats, duplicate_examples=tuple(examples))
    return _fill_sizes(spec, Inventory(identity(spec, "list", data), relpaths, size_arr, [], stats))


# ---- reading the list's rows --------------------------------------------------------------------


def _format(src: str) -> tuple[str, str | None]:
    """(format, compression) from the file name: .parquet/.pq, .csv, .tsv, else text; .gz allowed."""
    name = src.rsplit("/", 1)[-1].lower()
    compression = "gzip" if name.endswith(".gz") else None
    if compression:
        name = name[:-3]
    ext = name.rsplit(".", 1)[-1] if "." in name else ""
    return {"parquet": "parquet", "pq": "parquet", "csv": "csv", "tsv": "tsv"}.get(ext, "text"), compression


def _parse(spec: SourceSpec, data: bytes) -> tuple[list[bytes], list[int], list[str], int]:
    """The path of each entry (raw bytes), its size or UNKNOWN, where it was ('line 3') and the
    number of blank lines."""
    fmt, compression = _format(spec.src)
    if compression:
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as exc:
            raise UserError(f"list {spec.src} is not readable gzip: {first_line(exc)}") from None
    if fmt == "text":
        return _parse_text(data)
    table = _parquet_table(spec, data) if fmt == "parquet" else _csv_table(spec, data, fmt)
    return _table_rows(spec, table, first_row=1 if fmt == "parquet" else 2)


def _parse_text(data: bytes) -> tuple[list[bytes], list[int], list[str], int]:
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()  # the newline that ends the last line
    names, where, blank = [], [], 0
    for number, line in enumerate(lines, 1):
        line = line.removesuffix(b"\r")
        if not line.strip():
            blank += 1
            continue
        names.append(line)
        where.append(f"line {number}")
    return names, [UNKNOWN] * len(names), where, blank


def _columns_or_fail(spec: SourceSpec, columns: list[str]) -> bool:
    """Whether the list has a size column; a missing path column (or a --size-column that was
    asked for by name and is not there) is one line naming the columns there are."""
    if spec.path_column not in columns:
        raise UserError(
            f"list {spec.src} has no column {spec.path_column!r} (its columns: {', '.join(columns) or 'none'}); "
            "pass --path-column"
        )
    if spec.size_column not in columns and spec.size_column != "size":
        raise UserError(f"list {spec.src} has no column {spec.size_column!r} (its columns: {', '.join(columns)})")
    return spec.size_column in columns


def _csv_table(spec: SourceSpec, data: bytes, fmt: str) -> pa.Table:
    delimiter = "\t" if fmt == "tsv" else ","
    header_line = data.split(b"\n", 1)[0].removesuffix(b"\r").decode("utf-8", "replace")
    columns = next(csv.reader([header_line], delimiter=delimiter), [])
    with_size = _columns_or_fail(spec, columns)
    wanted = [spec.path_column] + ([spec.size_column] if with_size else [])
    types = {spec.path_column: pa.large_binary()} | ({spec.size_column: pa.int64()} if with_size else {})
    try:
        return pacsv.read_csv(
            io.BytesIO(data),
            parse_options=pacsv.ParseOptions(delimiter=delimiter),
            convert_options=pacsv.ConvertOptions(include_columns=wanted, column_types=types),
            read_options=pacsv.ReadOptions(use_threads=False),
        )
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        raise UserError(f"list {spec.src} is not a readable {fmt.upper()}: {first_line(exc)}") from None


def _parquet_table(spec: SourceSpec, data: bytes) -> pa.Table:
    try:
        pf = pq.ParquetFile(pa.BufferReader(data), pre_buffer=False)  # see chunks.read_parquet
        with_size = _columns_or_fail(spec, pf.schema_arrow.names)
        wanted = [spec.path_column] + ([spec.size_column] if with_size else [])
        table = pf.read(columns=wanted, use_threads=False)
    except (pa.ArrowInvalid, OSError) as exc:
        raise UserError(f"list {spec.src} is not a readable Parquet file: {first_line(exc)}") from None
    path_type = table.schema.field(spec.path_column).type
    kinds = (pa.types.is_string, pa.types.is_large_string, pa.types.is_binary, pa.types.is_large_binary)
    if not any(kind(path_type) for kind in kinds):
        raise UserError(f"list {spec.src}: column {spec.path_column!r} holds {path_type}, not paths")
    table = table.set_column(0, spec.path_column, table.column(0).cast(pa.large_binary()))
    if with_size:
        size_type = table.schema.field(spec.size_column).type
        if not pa.types.is_integer(size_type):
            raise UserError(f"list {spec.src}: column {spec.size_column!r} holds {size_type}, not byte counts")
    return table


def _table_rows(spec: SourceSpec, table: pa.Table, first_row: int) -> tuple[list[bytes], list[int], list[str], int]:
    paths = table.column(spec.path_column).to_pylist()
    if spec.size_column in table.column_names:
        sizes = table.column(spec.size_column).fill_null(UNKNOWN).to_numpy().astype(np.int64)
        if (sizes < UNKNOWN).any():
            row = int(np.argmax(sizes < UNKNOWN)) + first_row
            raise UserError(f"list {spec.src} row {row}: size {int(sizes[row - first_row])} is negative")
    else:
        sizes = np.full(len(paths), UNKNOWN, np.int64)
    names, kept, where, blank = [], [], [], 0
    for i, p in enumerate(paths):
        if p is None or not p.strip():
            blank += 1
            continue
        names.append(p)
        kept.append(int(sizes[i]))
        where.append(f"row {i + first_row}")
    return names, kept, where, blank


# ---- entries → names relative to --root, one filesystem ---------------------------------------


def _normalise(spec: SourceSpec, raw: list[bytes], where: list[str]) -> list[bytes]:
    """Each entry as it will be recorded: relative to --root when under it, else as listed."""
    prefixes: tuple[str, ...] = ()
    if spec.root is not None:
        root_loc = locate(spec.root)
        prefixes = tuple({spec.root.rstrip("/") + "/", root_loc.url().rstrip("/") + "/"})
    names = []
    for entry, at in zip(raw, where, strict=True):
        name = decode_name(entry)
        if is_absolute(name):
            under = next((p for p in prefixes if name.startswith(p)), None)
            if under is not None:
                name = name[len(under) :]
        elif spec.root is None:
            raise UserError(f"list {spec.src} {at}: {name!r} is a relative path; pass --root to say what it is under")
        if not is_absolute(name):
            name = posixpath.normpath(name)
            if name in (".", "") or name.startswith("../"):
                raise UserError(f"list {spec.src} {at}: {decode_name(entry)!r} is not a file under --root")
        names.append(encode_name(name))
    return names


def _check_filesystem(spec: SourceSpec, raw: list[bytes], where: list[str]) -> None:
    """Every entry on one filesystem that fsspec can open: an unknown scheme or a mix is one line."""
    classes: dict[type, str] = {}
    if spec.root is not None:
        classes[type(locate(spec.root).fs)] = f"--root {spec.root}"
    seen: set[str] = set()
    for entry, at in zip(raw, where, strict=True):
        if entry.startswith(b"/"):
            scheme = "file"
        elif b"://" in entry and is_absolute(name := decode_name(entry)):
            scheme = name.split("://", 1)[0].lower()
        else:
            continue  # relative: on --root's filesystem
        if scheme in seen:
            continue
        seen.add(scheme)
        try:
            cls = fsspec.get_filesystem_class(scheme)
        except ValueError:
            what = decode_name(entry)
            raise UserError(f"list {spec.src} {at}: {what!r} has a scheme fsspec does not know ({scheme}://)") from None
        except ImportError as exc:
            raise UserError(f"list {spec.src} {at}: {scheme}:// needs a package: {first_line(exc)}") from None
        classes.setdefault(cls, f"{at} ({scheme})")
    if len(classes) > 1:
        raise UserError(
            f"list {spec.src} mixes filesystems ({'; '.join(classes.values())}); one pack reads from one filesystem"
        )


def _fill_sizes(spec: SourceSpec, inv: Inventory) -> Inventory:
    """Sizes the list did not give, looked up (a stat, or a HEAD request per object); entries not
    there are moved to `missing` with the reason, and planned no further."""
    todo = np.flatnonzero(inv.sizes == UNKNOWN)
    if not len(todo):
        return inv
    resolver = inv.resolver()
    fs = resolver.location.fs
    files = [resolver.file(decode_name(inv.relpaths[int(i)].as_py()), UNKNOWN) for i in todo]

    def size_of(fs_path: str) -> int | str:
        try:
            if isinstance(fs, LocalFileSystem):
                st = os.stat(fs_path)
                return st.st_size if not stat.S_ISDIR(st.st_mode) else "a folder, not a file"
            info = retrying(lambda: fs.info(fs_path), 3, 0.5, f"size of {fs_path}")
            return int(info.get("size") or 0) if info.get("type", "file") == "file" else "a folder, not a file"
        except FileNotFoundError:
            return "not found"
        except Exception as exc:
            return f"cannot read: {reason(exc)}"

    if isinstance(fs, LocalFileSystem):
        found = [size_of(f.fs_path) for f in files]
    else:
        with ThreadPoolExecutor(SIZE_THREADS) as pool:
            found = list(pool.map(size_of, [f.fs_path for f in files]))
    sizes = inv.sizes.copy()
    keep = np.ones(len(sizes), bool)
    missing = []
    for i, f, got in zip(todo, files, found, strict=True):
        if isinstance(got, str):
            keep[i] = False
            missing.append(Missing(f.path, valid_text(got)))  # the same text after a trip through the listing
        else:
            sizes[i] = got
    if not keep.any():
        raise UserError(
            f"none of the {len(sizes)} entries of list {spec.src} can be read "
            f"(first: {missing[0].path}: {missing[0].reason})"
        )
    return Inventory(inv.identity, inv.relpaths.filter(pa.array(keep)), sizes[keep], missing, inv.stats)


def load(spec: SourceSpec, kind: str, exclude: str | None, list_bytes: bytes | None) -> Inventory:
    if kind == "folder":
        return from_folder(spec, exclude)
    return from_list(spec, list_bytes if list_bytes is not None else read_list_bytes(spec))
