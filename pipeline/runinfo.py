"""OUT/run.json: what a run is made of (its shards and the settings that shape the features), so a
rerun, a later `featpipe consolidate` and `featpipe verify` all see the same job."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

from pipeline import __version__
from pipeline.errors import UserError
from pipeline.shardlist import ShardRef
from pipeline.storage import Location, commit_json, read_json

RUN_FILE = "run.json"


@dataclass(frozen=True)
class RunInfo:
    settings: dict  # model and transform: anything that changes the numbers
    shards: list[dict]  # name, url, expected — in consolidation order
    dim: int | None = None  # the model's feature size, so a run without one good image still has it

    @property
    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(self.settings, sort_keys=True).encode()).hexdigest()[:16]

    @property
    def shard_names(self) -> list[str]:
        return [s["name"] for s in self.shards]

    def to_json(self) -> dict:
        return {"featpipe_version": __version__, "fingerprint": self.fingerprint, **asdict(self)}


def make_run(settings: dict, shards: list[ShardRef], dim: int) -> RunInfo:
    return RunInfo(settings, [{"name": s.name, "url": s.url, "expected": s.expected} for s in shards], dim)


def load_run(out: Location) -> RunInfo:
    path = out.join(RUN_FILE)
    if not out.fs.exists(path):
        raise UserError(f"{out.url()} holds no featpipe run (no {RUN_FILE}); run `featpipe extract` first")
    data = read_json(out.fs, path)
    return RunInfo(data["settings"], data["shards"], data.get("dim"))


def check_compatible(out: Location, run: RunInfo) -> bool:
    """True when OUT already holds this run; refuses a run made with other settings or shards."""
    path = out.join(RUN_FILE)
    if not out.fs.exists(path):
        return False
    old = load_run(out)
    if old.fingerprint != run.fingerprint:
        changed = sorted(k for k in set(old.settings) | set(run.settings) if old.settings.get(k) != run.settings.get(k))
        raise UserError(f"{out.url()} holds features made with other settings ({', '.join(changed)}); "
                        "use --overwrite to replace them, or another OUT")
    if old.shard_names != run.shard_names:
        raise UserError(f"{out.url()} holds a run over another shard list ({len(old.shards)} shards, now "
                        f"{len(run.shards)}); use --overwrite to replace it, or another OUT")
    return True


def write_run(out: Location, run: RunInfo) -> None:
    commit_json(out.fs, out.join(RUN_FILE), run.to_json())
