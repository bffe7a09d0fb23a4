"""`featpipe verify OUT`: is every shard accounted for, and do the consolidated files agree with
the chunks? Each problem is one line; no problems means exit 0."""

from __future__ import annotations

import json

import numpy as np
import torch

from pipeline.chunks import chunk_matrix, read_chunk
from pipeline.extract.inputs import resolve_shards
from pipeline.outdir import OutputNames, load_run, read_done
from pipeline.storage import Location, locate


def verify(out_url: str, shards_spec: str | None, names: OutputNames = OutputNames()) -> tuple[list[str], str]:
    out = locate(out_url)
    run = load_run(out)
    problems: list[str] = []
    expected = {s.name: s.expected for s in run.shards}
    if shards_spec:
        listed = resolve_shards(shards_spec)
        if [s.name for s in listed] != run.shard_names:
            problems.append(
                f"the run in OUT covers {len(run.shards)} shards, {shards_spec} lists {len(listed)}"
                " (or in another order)"
            )
        expected.update({s.name: s.expected for s in listed if s.expected is not None})
    paths: list[str] = []
    mats: list[tuple[str, np.ndarray]] = []
    keys: set[str] = set()
    n_errors = n_failed = 0
    for shard in run.shard_names:
        try:
            rec = read_done(out, shard)
        except FileNotFoundError:
            problems.append(f"{shard}: no chunk and no done record (unfinished: rerun extract)")
            continue
        if rec.fingerprint != run.fingerprint:
            problems.append(f"{shard}: made with other settings than the run")
        n_errors += len(rec.errors)
        n_failed += bool(rec.failed)
        if rec.rows + len(rec.errors) != rec.read:
            problems.append(f"{shard}: read {rec.read} samples but {rec.rows} rows + {len(rec.errors)} errors")
        want = expected.get(shard)
        if want is not None and not rec.failed and rec.read != want:
            problems.append(f"{shard}: {rec.read} samples read, the manifest says {want}, and no failure recorded")
        if not rec.rows:
            continue
        try:
            table = read_chunk(out, shard)
        except FileNotFoundError:
            problems.append(f"{shard}: done record says {rec.rows} rows but the chunk is missing")
            continue
        if len(table) != rec.rows:
            problems.append(f"{shard}: chunk has {len(table)} rows, done record says {rec.rows}")
        for k in table.column("key").to_pylist():
            if k in keys:
                problems.append(f"{shard}: key {k} appears twice")
            keys.add(k)
        paths += table.column("path").to_pylist()
        mats.append((shard, chunk_matrix(table)))
    if not problems:
        problems += _check_outputs(out, names, paths, mats, run.dim)
    summary = (
        f"{'OK' if not problems else 'FAILED'}: {len(paths)} rows from {len(run.shards)} shards; "
        f"{n_errors} samples recorded as failed, {n_failed} shards recorded as failed"
        + (f"; {len(problems)} problems" if problems else "")
    )
    return problems, summary


def _check_outputs(
    out: Location, names: OutputNames, paths: list[str], mats: list[tuple[str, np.ndarray]], run_dim: int | None
) -> list[str]:
    problems = []
    n = len(paths)
    dim = mats[0][1].shape[1] if mats else (run_dim or 0)
    try:
        with out.fs.open(out.join(names.img_list), "rb") as f:
            listed = json.load(f)
        if listed != paths:
            problems.append(f"{names.img_list}: {len(listed)} paths that do not match the chunks' {n} rows")
        with out.fs.open(out.join(names.numpy_features), "rb") as f:
            f16 = np.load(f)
        with out.fs.open(out.join(names.torch_features), "rb") as f:
            f32 = torch.load(f, map_location="cpu", weights_only=True)
    except FileNotFoundError as exc:
        return [f"missing consolidated output: {exc.filename or exc} (run `featpipe consolidate`)"]
    if f16.dtype != np.float16 or f16.shape != (n, dim):
        return problems + [f"{names.numpy_features}: {f16.dtype} {f16.shape}, expected float16 {(n, dim)}"]
    if f32.dtype != torch.float32 or tuple(f32.shape) != (n, dim):
        return problems + [f"{names.torch_features}: {f32.dtype} {tuple(f32.shape)}, expected float32 {(n, dim)}"]
    row = 0
    f32 = f32.numpy()
    for shard, mat in mats:
        part = slice(row, row + len(mat))
        if not np.array_equal(f32[part], mat):
            problems.append(f"{names.torch_features}: rows of {shard} differ from its chunk")
        if not np.array_equal(f16[part], mat.astype(np.float16)):
            problems.append(f"{names.numpy_features}: rows of {shard} differ from its chunk")
        row += len(mat)
    return problems
