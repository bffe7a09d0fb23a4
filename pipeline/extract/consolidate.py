"""Chunks → OUT/fts.npy (float16), OUT/fts.pth (float32 tensor), OUT/img_list.json, OUT/errors.jsonl.

Rows go in the run's shard order, then in-shard order, so the bytes do not depend on how many
workers or ranks produced the chunks. Arrays are filled through memory maps one chunk at a time:
memory stays flat however many images there are.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass

import numpy as np
import torch
from numpy.lib.format import open_memmap

from pipeline.chunks import chunk_matrix, read_chunk
from pipeline.errors import UserError
from pipeline.faults import crash_point
from pipeline.outdir import OutputNames, RunInfo, read_done
from pipeline.storage import Location, commit_file, staging_file


@dataclass
class Consolidated:
    rows: int
    dim: int
    errors: int
    failed_shards: list[str]


def consolidate(out: Location, run: RunInfo, names: OutputNames = OutputNames()) -> Consolidated:
    records = []
    missing = []
    for shard in run.shard_names:
        try:
            records.append(read_done(out, shard))
        except FileNotFoundError:
            missing.append(shard)
    if missing:
        raise UserError(
            f"{len(missing)} of {len(run.shard_names)} shards are not finished (first: {missing[0]}); "
            "rerun the same extract command to finish them"
        )
    rows = sum(r.rows for r in records)
    dims = {r.dim for r in records if r.rows}
    if len(dims) > 1:
        raise UserError(f"chunks in {out.url()} disagree on the feature size: {sorted(dims)}")
    dim = dims.pop() if dims else (run.dim or 0)
    with tempfile.TemporaryDirectory(prefix="featpipe-consolidate-") as tmp:
        f32_path = os.path.join(tmp, "fts32.npy")
        npy_staged = staging_file(out.fs, out.join(names.numpy_features))
        list_staged = staging_file(out.fs, out.join(names.img_list))
        err_staged = staging_file(out.fs, out.join(names.errors))
        f16 = open_memmap(npy_staged, mode="w+", dtype=np.float16, shape=(rows, dim))
        f32 = open_memmap(f32_path, mode="w+", dtype=np.float32, shape=(rows, dim))
        n_errors = 0
        with open(list_staged, "w", encoding="utf-8") as img_list, open(err_staged, "w", encoding="utf-8") as errs:
            img_list.write("[")
            row = 0
            for rec in records:
                if rec.rows:
                    table = read_chunk(out, rec.shard)
                    mat = chunk_matrix(table)
                    f32[row : row + len(mat)] = mat
                    f16[row : row + len(mat)] = mat
                    for p in table.column("path").to_pylist():
                        img_list.write(("\n" if row == 0 else ",\n") + json.dumps(p, ensure_ascii=False))
                        row += 1
                for e in rec.all_errors():
                    errs.write(json.dumps(e.to_json(), ensure_ascii=False, sort_keys=True) + "\n")
                    n_errors += 1
            img_list.write("\n]\n")
        f16.flush()
        f32.flush()
        del f16
        pth_staged = staging_file(out.fs, out.join(names.torch_features))
        # torch.save streams the tensor's storage, which here is the memory map: no full copy in RAM.
        # A file object, not a path: torch names the zip's inner folder after a path, and the
        # temporary name would make the bytes differ from run to run.
        with open(pth_staged, "wb") as f:
            torch.save(torch.from_numpy(f32), f)
        del f32
        for staged, name in (
            (npy_staged, names.numpy_features),
            (pth_staged, names.torch_features),
            (list_staged, names.img_list),
            (err_staged, names.errors),
        ):
            commit_file(out.fs, staged, out.join(name))
            crash_point("consolidate")
    return Consolidated(rows, dim, n_errors, [r.shard for r in records if r.failed])
