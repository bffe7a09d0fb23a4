"""What a sample carries besides its image, and which member the image is (issue 30). This module
owns those rules:

- the image: the sample's `.json` `field` when featpipe pack wrote one, else the first member
  present of `--image-field` ("jpg;png;webp": webdataset's `to_tuple` syntax; default any image
  extension, in IMAGE_EXTENSIONS' order). Other images in the sample are named in the row's
  `other_images` column: skipped, but not silently.
- the metadata: the caption (`.txt`) and the scalar fields of the `.json` (img2dataset's url,
  status, sha256, original_width, its --save_additional_columns; featpipe pack's relpath, size,
  format), kept as chunk columns under their own names (`--meta` chooses, `--no-meta` keeps none).
  A field named like one of featpipe's own columns (key, width, …) keeps featpipe's value: for
  img2dataset's and pack's shards they are the same values.
- their types: a field's column takes the type its values share within a shard; values of mixed
  types become text. Consolidation unifies the shards' types the same way for metadata.parquet.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import UserError
from pipeline.image.header import IMAGE_EXTENSIONS
from pipeline.names import clean_text

# featpipe's own chunk columns: a metadata field never takes one of these names
RESERVED = ("key", "path", "shard", "index", "width", "height", "offset", "length", "embedding")
CAPTION = "caption"
OTHER_IMAGES = "other_images"
SHARDS_KEY = "featpipe.shards"  # metadata.parquet's footer: the shard of each row group, in order
Scalar = str | int | float | bool | None


@dataclass(frozen=True)
class SampleRules:
    image_fields: tuple[str, ...] = IMAGE_EXTENSIONS  # the first present is the image
    meta: tuple[str, ...] | None = None  # fields kept; None: the caption and every scalar field

    def fingerprint(self) -> dict:
        """Only what differs from the defaults: runs made before these rules keep their fingerprint."""
        out: dict = {}
        if self.image_fields != IMAGE_EXTENSIONS:
            out["image_field"] = ";".join(self.image_fields)
        if self.meta is not None:
            out["meta"] = list(self.meta)
        return out


def parse_image_field(spec: str) -> tuple[str, ...]:
    """`--image-field "jpg;png;webp"` → ("jpg", "png", "webp")."""
    fields = tuple(f.strip().lstrip(".").lower() for f in spec.split(";") if f.strip().lstrip("."))
    if not fields:
        raise UserError(f"--image-field {spec!r} names no field; give extensions such as 'jpg;png;webp'")
    return fields


def parse_meta(spec: str) -> tuple[str, ...]:
    """`--meta caption,url,status` → the fields kept (a name of featpipe's own columns is refused)."""
    fields = tuple(dict.fromkeys(f.strip() for f in spec.split(",") if f.strip()))
    clash = [f for f in fields if f in RESERVED]
    if clash:
        raise UserError(f"--meta {','.join(clash)}: featpipe's own column of that name is always kept")
    if not fields:
        raise UserError("--meta names no field; use --no-meta to keep none")
    return fields


def pick_image(sample: dict, recorded: object, rules: SampleRules) -> tuple[str | None, list[str]]:
    """The image member's field and the other image fields skipped beside it."""
    present = [f for f in sample if not f.startswith("__") and f in IMAGE_EXTENSIONS]
    if isinstance(recorded, str) and recorded in sample:
        field = recorded
    else:
        field = next((f for f in rules.image_fields if f in sample), None)
    return field, [f for f in present if f != field]


def sample_meta(sample: dict, meta: dict, others: list[str], rules: SampleRules) -> dict[str, Scalar]:
    """The metadata kept for one sample, in a stable order (caption first, then the .json's)."""
    found: dict[str, Scalar] = {}
    if isinstance(sample.get("txt"), bytes):
        found[CAPTION] = clean_text(sample["txt"].decode("utf-8", "replace"))
    for name, value in meta.items():
        if name in RESERVED or name in found:
            continue
        if isinstance(value, str):
            found[name] = clean_text(value)
        elif value is None or isinstance(value, bool | float) or (isinstance(value, int) and abs(value) < 2**63):
            found[name] = value
        elif rules.meta is not None and name in rules.meta:  # asked for by name: kept as JSON text
            found[name] = clean_text(json.dumps(value, ensure_ascii=False))
    if rules.meta is not None:
        found = {name: found[name] for name in rules.meta if name in found}
    if others:
        found[OTHER_IMAGES] = ";".join(others)
    return found


def columns(metas: list[dict[str, Scalar]]) -> dict[str, pa.Array]:
    """One shard's metadata as typed columns, names in order of first appearance."""
    names = list(dict.fromkeys(name for m in metas for name in m))
    return {name: _column([m.get(name) for m in metas]) for name in names}


def _column(values: list[Scalar]) -> pa.Array:
    try:
        arr = pa.array(values)
    except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):  # mixed types: text
        arr = None
    if arr is None or pa.types.is_null(arr.type):
        return pa.array([v if v is None or isinstance(v, str) else json.dumps(v) for v in values], pa.string())
    return arr


def unify(schemas: list[pa.Schema]) -> pa.Schema:
    """The metadata fields of many chunks as one schema: a type all share, float64 for a mix of
    numbers, else text."""
    types: dict[str, list[pa.DataType]] = {}
    for schema in schemas:
        for f in schema:
            if f.name not in RESERVED:
                types.setdefault(f.name, []).append(f.type)
    return pa.schema([pa.field(name, _common(found)) for name, found in types.items()])


def _common(found: list[pa.DataType]) -> pa.DataType:
    kinds = set(found)
    if len(kinds) == 1:
        return found[0]
    if all(pa.types.is_integer(t) for t in kinds):
        return pa.int64()
    if all(pa.types.is_integer(t) or pa.types.is_floating(t) for t in kinds):
        return pa.float64()
    return pa.string()


def aligned(table: pa.Table, schema: pa.Schema) -> list[pa.Array]:
    """`table`'s metadata columns in `schema`'s order and types (nulls where it has none)."""
    out = []
    for f in schema:
        if f.name in table.column_names:
            out.append(table.column(f.name).combine_chunks().cast(f.type))
        else:
            out.append(pa.nulls(len(table), f.type))
    return out


class MetadataFile:
    """OUT/metadata/metadata.parquet: each row's key and path, then the metadata columns of all
    chunks (one schema: `unify`), a row group per shard, row-aligned with fts.npy (embedding-reader's
    npy + parquet layout: `EmbeddingReader(OUT, metadata_folder=OUT/metadata, file_format="parquet_npy")`)."""

    def __init__(self, path: str, chunk_schemas: list[pa.Schema]):
        self.fields = unify(chunk_schemas)
        self.schema = pa.schema([pa.field("key", pa.string()), pa.field("path", pa.string()), *self.fields])
        self.writer = pq.ParquetWriter(path, self.schema, compression="zstd")
        self.shards: list[str] = []

    def add(self, shard: str, chunk: pa.Table) -> None:
        """A shard's rows as one row group: its footer entry says where the shard's rows start."""
        arrays = [chunk.column("key"), chunk.column("path"), *aligned(chunk, self.fields)]
        self.writer.write_table(pa.Table.from_arrays(arrays, schema=self.schema), row_group_size=max(1, len(chunk)))
        self.shards.append(shard)

    def close(self) -> None:
        """The row groups' shard names go in the footer (byrow.py reads a few rows by them)."""
        self.writer.add_key_value_metadata({SHARDS_KEY: json.dumps(self.shards)})
        self.writer.close()
