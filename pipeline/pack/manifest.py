"""DEST/manifest.json: the shards in order (samples, bytes, the listing that planned each), the
totals, every file that did not become a sample and why, and the entries gone from SRC since they
were packed (their samples stay in the shards; extract marks their rows removed)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from pipeline import __version__
from pipeline.pack.inventory import PRESENT, Inventory, decode_name


def build_manifest(
    src: str, options: dict, root: str | None, inv: Inventory, destination: str, done: list[tuple[dict, int]]
) -> dict:
    """From each shard's commit record and generation, in shard order."""
    records = [r for r, _ in done]
    shards = [{"name": r["name"], "samples": r["samples"], "bytes": r["bytes"], "generation": g} for r, g in done]
    skipped = [{"path": m.path, "reason": m.reason} for m in inv.missing] + [s for r in records for s in r["skipped"]]
    manifest = {
        "featpipe_version": __version__,
        "source": src,
        "destination": destination,
        "options": options,
        "shards": shards,
        "totals": {
            "shards": len(shards),
            "samples": sum(s["samples"] for s in shards),
            "bytes": sum(s["bytes"] for s in shards),
            "image_files": len(inv) + len(inv.missing),
            "skipped": len(skipped),
            "ignored_non_images": inv.stats.ignored,
        },
        "skipped": skipped,
        "generation": inv.generation,
        "removed": removed_entries(inv),
    }
    manifest["totals"]["removed"] = len(manifest["removed"])
    if inv.identity.kind == "list":
        manifest["list"] = {
            "root": root,
            "blank_lines": inv.stats.blank_lines,
            "duplicate_entries": inv.stats.duplicates,
            "duplicate_examples": list(inv.stats.duplicate_examples),
        }
    return manifest


def removed_entries(inv: Inventory) -> list[dict]:
    """Entries gone from SRC since they were packed: the path as the shards' samples record it, the
    listing that added it and the one that found it gone (extract marks their rows removed)."""
    gone = np.flatnonzero(inv.removed != PRESENT)
    if not len(gone):
        return []
    resolver = inv.resolver()
    names = inv.relpaths.take(pa.array(gone)).to_pylist()
    return [
        {"path": resolver.file(decode_name(n), 0).path, "generation": int(g), "removed_in": int(r)}
        for n, g, r in zip(names, inv.generations[gone], inv.removed[gone], strict=True)
    ]
