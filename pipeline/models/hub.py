"""Models from torch.hub (`hub:owner/repo[:ref]/entry`, or --model-repo/--model-name): GitHub
(cached in TORCH_HOME) or a local hub directory, optionally with local weights; ImageNet
preprocessing (featpipe's default). Offline failures become one actionable line."""

from __future__ import annotations

import contextlib
import os
import re
import urllib.error
from pathlib import Path

import torch

from pipeline.errors import UserError, first_line
from pipeline.models.base import Loaded, ModelConfig, is_local_repo

_GITHUB_REPO = re.compile(r"[\w.-]+/[\w.-]+(:[\w./-]+)?")
LOCAL_HUB = Path(__file__).resolve().parents[1] / "hub"
_OFFLINE_HELP = (
    "offline options: a TORCH_HOME that already caches the repo (and its weights), or "
    "--model-repo PATH to a local checkout or any directory with a hubconf.py, with --weights FILE "
    f"for local weights (featpipe ships an offline one: {LOCAL_HUB})"
)


def check(cfg: ModelConfig) -> None:
    """Cheap checks that must fail before any output is written."""
    if cfg.weights and not os.path.isfile(cfg.weights):
        raise UserError(f"--weights file not found: {cfg.weights}")
    if is_local_repo(cfg.repo):
        if not os.path.isfile(os.path.join(cfg.repo, "hubconf.py")):
            raise UserError(f"--model-repo {cfg.repo} is a directory without a hubconf.py")
    elif cfg.repo.startswith((".", "/", "~")) or not _GITHUB_REPO.fullmatch(cfg.repo):
        raise UserError(f"--model-repo {cfg.repo}: no such directory, and not a GitHub owner/repo[:ref]")


def load(cfg: ModelConfig) -> Loaded:
    return Loaded(load_module(cfg), None, None, {"torch": torch.__version__})


def from_spec(cfg: ModelConfig) -> ModelConfig:
    """`hub:owner/repo[:ref]/entry` (or `hub:/local/dir/entry`) as --model-repo / --model-name."""
    ident = cfg.spec.split(":", 1)[1]
    repo, _, name = ident.rpartition("/")
    if not repo or not name:
        raise UserError(
            f"--model {cfg.spec}: give hub:owner/repo[:ref]/entry, e.g. hub:facebookresearch/dinov2/dinov2_vits14"
        )
    return ModelConfig(repo, name, cfg.weights)


def load_module(cfg: ModelConfig) -> torch.nn.Module:
    check(cfg)
    kwargs = {"pretrained": False} if cfg.weights else {}
    try:
        model = _hub_load(cfg, kwargs)
    except TypeError as exc:
        if not kwargs or "pretrained" not in str(exc):
            raise UserError(f"model entry {cfg.name} in {cfg.repo} failed: {exc}") from None
        model = _hub_load(cfg, {})  # an entry without a `pretrained` switch
    if cfg.weights:
        _load_weights(model, cfg.weights)
    return model.eval()


def _hub_load(cfg: ModelConfig, kwargs: dict) -> torch.nn.Module:
    if is_local_repo(cfg.repo):
        try:
            return torch.hub.load(cfg.repo, cfg.name, source="local", **kwargs)
        except RuntimeError as exc:
            if "Cannot find callable" not in str(exc):
                raise
            raise UserError(
                f"no entry {cfg.name!r} in {cfg.repo}/hubconf.py; it has: {', '.join(_local_entries(cfg.repo))}"
            ) from None
    try:
        with _one_fetch_per_node():
            return torch.hub.load(
                _cached_ref(cfg.repo),
                cfg.name,
                source="github",
                trust_repo=True,
                skip_validation=True,
                verbose=False,
                **kwargs,
            )
    except (urllib.error.URLError, ConnectionError, TimeoutError) as exc:
        raise UserError(
            f"cannot fetch {cfg.repo} / {cfg.name} from the network ({_reason(exc)}); {_OFFLINE_HELP}"
        ) from None
    except RuntimeError as exc:
        if "internet" in str(exc) or "Cannot find callable" in str(exc):
            raise UserError(f"{cfg.repo} / {cfg.name}: {first_line(exc)}; {_OFFLINE_HELP}") from None
        raise


@contextlib.contextmanager
def _one_fetch_per_node():
    """torch.hub's GitHub loads one at a time per TORCH_HOME: ranks started together each fetched
    the repo's zip to the same file and removed it under the others (FileNotFoundError: …main.zip,
    pytorch#68320), and each downloaded the weights. Under an exclusive lock on a file in the hub
    folder, the first local rank fetches and the others then load from its cache."""
    import fcntl

    folder = torch.hub.get_dir()
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, ".featpipe-fetch.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _local_entries(repo: str) -> list[str]:
    import importlib.util

    spec = importlib.util.spec_from_file_location("featpipe_hubconf", os.path.join(repo, "hubconf.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return sorted(
        n
        for n in dir(module)
        if callable(getattr(module, n))
        and not n.startswith("_")
        and getattr(getattr(module, n), "__module__", None) == module.__name__
    )


def _cached_ref(repo: str) -> str:
    """torch.hub asks GitHub for the default branch when no ref is given; with the repo already
    cached, name the cached branch so a job on an offline node never touches the network."""
    if ":" in repo:
        return repo
    owner_name = repo.replace("/", "_")
    for ref in ("main", "master"):
        if os.path.isdir(os.path.join(torch.hub.get_dir(), f"{owner_name}_{ref}")):
            return f"{repo}:{ref}"
    return repo


def _reason(exc: BaseException) -> str:
    why = getattr(exc, "reason", None)
    return str(why) if why else first_line(exc)


def _load_weights(model: torch.nn.Module, path: str) -> None:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UserError(f"cannot load --weights {path}: {first_line(exc)}") from None
    for key in ("state_dict", "model", "teacher"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict):
        raise UserError(f"--weights {path} holds a {type(state).__name__}, not a state dict")
    state = {k.removeprefix("module.").removeprefix("backbone."): v for k, v in state.items()}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        lines = str(exc).splitlines()
        raise UserError(
            f"--weights {path} do not fit the model: {lines[1].strip() if len(lines) > 1 else first_line(exc)}"
        ) from None
