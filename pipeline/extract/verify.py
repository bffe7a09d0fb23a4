"""`featpipe verify OUT`: is every shard accounted for, and do the consolidated files agree with
the chunks? Each problem is one line (a damaged file is a problem, never a traceback); no problems
means exit 0."""

from __future__ import annotations

import json

import numpy as np

from pipeline.chunks import chunk_matrix, read_chunk
from pipeline.errors import UserError, reason
from pipeline.extract.inputs import resolve_shards
from pipeline.outdir import DoneRecord, OutputNames, RunInfo, chunk_path, load_run, read_done
from pipeline.storage import Location, locate


def verify(out_url: str, shards_spec: str | None, names: OutputNames = OutputNames()) -> tuple[list[str], str]:
    out = locate(out_url)
    try:
        run = load_run(out)
    except (ValueError, KeyError, TypeError) as exc:
        raise UserError(f"{out.join('run.json')} is damaged ({reason(exc)}); rerun extract with --overwrite") from None
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
    records = _records(out, run, problems)
    paths: list[str] = []
    mats: list[tuple[str, np.ndarray]] = []
    keys: set[str] = set()
    for rec in records:
        _check_record(rec, run, expected.get(rec.shard), problems)
        if not rec.rows:
            continue
        try:
            table = read_chunk(out, rec.shard)
        except FileNotFoundError:
            problems.append(f"{rec.shard}: done record says {rec.rows} rows but the chunk is missing")
            continue
        except Exception as exc:  # pyarrow's ArrowInvalid, OSError: a truncated or overwritten file
            problems.append(
                f"{chunk_path(out, rec.shard)}: unreadable Parquet chunk ({reason(exc)}); "
                "rerun extract to redo that shard"
            )
            continue
        if len(table) != rec.rows:
            problems.append(f"{rec.shard}: chunk has {len(table)} rows, done record says {rec.rows}")
        for k in table.column("key").to_pylist():
            if k in keys:
                problems.append(f"{rec.shard}: key {k} appears twice")
            keys.add(k)
        paths += table.column("path").to_pylist()
        mats.append((rec.shard, chunk_matrix(table)))
    if len(records) == len(run.shards):  # every shard committed: the consolidated files must agree
        problems += _check_outputs(out, names, paths, mats, run.dim)
        problems += _check_errors(out, names, records)
        problems += _check_digest(out, names)
    n_errors = sum(len(r.errors) for r in records)
    n_failed = sum(bool(r.failed) for r in records)
    summary = (
        f"{'OK' if not problems else 'FAILED'}: {len(paths)} rows from {len(run.shards)} shards; "
        f"{n_errors} samples recorded as failed, {n_failed} shards recorded as failed"
        + (f"; {len(problems)} problems" if problems else "")
    )
    return problems, summary


def _check_digest(out: Location, names: OutputNames) -> list[str]:
    """digest.json's recorded fingerprints against the vectors' bytes, hashed again: the one place
    that rehashes everything (consumers trust the record while the file's stamp holds)."""
    from pipeline.outdir import DIGEST_FILE
    from pipeline.retrieve.features import open_features

    if names.numpy_features != OutputNames().numpy_features or not out.fs.exists(out.join(DIGEST_FILE)):
        return []
    try:
        recorded = json.loads(out.fs.cat_file(out.join(DIGEST_FILE)))["fingerprints"]
        fs = open_features(out.url())
        wrong = [n for n, fp in recorded.items() if int(n) <= fs.n and fs.hash_rows(int(n)) != fp]
    except Exception as exc:  # damaged JSON, unreadable vectors
        return [f"{DIGEST_FILE}: cannot be checked ({reason(exc)}); rerun `featpipe consolidate`"]
    return [f"{DIGEST_FILE}: the first {n} rows' recorded fingerprint is not theirs" for n in wrong]


def _records(out: Location, run: RunInfo, problems: list[str]) -> list[DoneRecord]:
    records = []
    for shard in run.shard_names:
        try:
            records.append(read_done(out, shard))
        except FileNotFoundError:
            problems.append(f"{shard}: no chunk and no done record (unfinished: rerun extract)")
        except (ValueError, KeyError, TypeError) as exc:
            problems.append(f"{shard}: its done record is damaged ({reason(exc)}); rerun extract to redo the shard")
    return records


def _check_record(rec: DoneRecord, run: RunInfo, want: int | None, problems: list[str]) -> None:
    shard = rec.shard
    if rec.fingerprint != run.fingerprint:
        problems.append(f"{shard}: made with other settings than the run")
    if rec.retry:
        problems.append(f"{shard}: could not be read ({rec.failed}); rerun extract to read it again")
    elif rec.failed:
        problems.append(f"{shard}: damaged, {rec.rows} rows kept from before the damage ({rec.failed})")
    if rec.rows + len(rec.errors) != rec.read:
        problems.append(f"{shard}: read {rec.read} samples but {rec.rows} rows + {len(rec.errors)} errors")
    if want is not None and not rec.failed and rec.read != want:
        problems.append(f"{shard}: {rec.read} samples read, the manifest says {want}, and no failure recorded")


def _check_outputs(
    out: Location, names: OutputNames, paths: list[str], mats: list[tuple[str, np.ndarray]], run_dim: int | None
) -> list[str]:
    n = len(paths)
    dim = mats[0][1].shape[1] if mats else (run_dim or 0)
    try:
        listed = _load(out, names.img_list, lambda f: json.load(f))
        f16 = _load(out, names.numpy_features, lambda f: np.load(f, allow_pickle=False))
        f32 = _load(out, names.torch_features, _load_tensor) if names.torch_features else None
    except _Unusable as exc:
        return [str(exc)]
    problems = []
    if listed != paths:
        problems.append(f"{names.img_list}: {len(listed)} paths that do not match the chunks' {n} rows")
    if f16.dtype != np.float16 or f16.shape != (n, dim):
        return [*problems, f"{names.numpy_features}: {f16.dtype} {f16.shape}, expected float16 {(n, dim)}"]
    if f32 is not None and (f32.dtype != np.float32 or f32.shape != (n, dim)):
        return [*problems, f"{names.torch_features}: {f32.dtype} {f32.shape}, expected float32 {(n, dim)}"]
    row = 0
    for shard, mat in mats:
        part = slice(row, row + len(mat))
        if f32 is not None and not np.array_equal(f32[part], mat):
            problems.append(f"{names.torch_features}: rows of {shard} differ from its chunk")
        if not np.array_equal(f16[part], mat.astype(np.float16)):
            problems.append(f"{names.numpy_features}: rows of {shard} differ from its chunk")
        row += len(mat)
    return problems


def _check_errors(out: Location, names: OutputNames, records: list[DoneRecord]) -> list[str]:
    """errors.jsonl must hold exactly the done records' errors, in run order."""
    want = [e.to_json() for rec in records for e in rec.all_errors()]
    try:
        got = _load(out, names.errors, lambda f: [json.loads(ln) for ln in f.read().decode().splitlines()])
    except _Unusable as exc:
        return [str(exc)]
    if got != want:
        return [
            f"{names.errors}: {len(got)} records that do not match the done records' {len(want)} "
            "(run `featpipe consolidate`)"
        ]
    return []


class _Unusable(Exception):
    pass


def _load(out: Location, name: str, read):
    try:
        with out.fs.open(out.join(name), "rb") as f:
            return read(f)
    except FileNotFoundError:
        raise _Unusable(f"missing consolidated output: {out.join(name)} (run `featpipe consolidate`)") from None
    except Exception as exc:  # damaged header, truncated data, an object array, a pickle
        raise _Unusable(f"{name}: unreadable ({reason(exc)}); run `featpipe consolidate` to rewrite it") from None


def _load_tensor(f) -> np.ndarray:
    import torch

    t = torch.load(f, map_location="cpu", weights_only=True)  # weights_only: a pickle in it is never run
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"holds a {type(t).__name__}, not a tensor")
    return t.numpy()
