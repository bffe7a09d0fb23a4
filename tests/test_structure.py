"""The package's shape: no import cycle between featpipe's modules (function-level imports
included), `featpipe pack` never loads torch, and every flag the README shows exists."""

from __future__ import annotations

import argparse
import ast
import re
import subprocess
import sys
from pathlib import Path

from conftest import ROOT

PACKAGE = ROOT / "pipeline"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Each module → the featpipe modules it imports anywhere in its body."""
    files = {module_name(p): p for p in PACKAGE.rglob("*.py") if "hub" not in p.parts}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("pipeline"):
                targets = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names if a.name.startswith("pipeline")]
            deps |= {t for t in targets if t in files and t != name and t != "pipeline"}
        graph[name] = deps
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                return stack[stack.index(dep) :] + [dep]
            if dep not in state and (cycle := visit(dep)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle_in_the_package():
    graph = import_graph()
    assert "pipeline.extract.run" in graph and "pipeline.image.header" in graph["pipeline.pack.packer"]
    assert find_cycle(graph) is None, " → ".join(find_cycle(graph))


def parquet_reads_with_read_ahead() -> list[str]:
    """Calls that open Parquet (`read_table`, `ParquetFile`) without `pre_buffer=False`: Arrow's
    read-ahead threads can abort the process at exit (see pipeline/chunks.py read_parquet)."""
    found = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
                continue
            if node.func.attr not in ("read_table", "ParquetFile", "ParquetDataset"):
                continue
            off = any(
                k.arg == "pre_buffer" and isinstance(k.value, ast.Constant) and k.value.value is False
                for k in node.keywords
            )
            if not off:
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    return found


def test_every_parquet_reader_turns_read_ahead_off():
    assert parquet_reads_with_read_ahead() == []
    assert (PACKAGE / "chunks.py").read_text().count("pre_buffer=False") >= 1


def test_pack_command_does_not_load_torch():
    code = (
        "import sys; from pipeline.cli import build_parser; import pipeline.pack.packer; print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "False"


SLURM_FLAGS = {"--nodes", "--ntasks-per-node", "--cpus-per-task", "--gpus-per-node"}  # #SBATCH lines
# `autofaiss build_index`'s, as the README shows it: run by tools/bench_interop.py (autofaiss lives in
# the bench's own venv, not here)
AUTOFAISS_FLAGS = {"--embeddings", "--index_path", "--index_infos_path", "--metric_type"}


def test_every_flag_the_readme_shows_exists():
    """The README's flags, each accepted by featpipe, a tools/ script, torchrun or sbatch."""
    from pipeline.cli import build_parser

    known = SLURM_FLAGS | AUTOFAISS_FLAGS
    for action in build_parser()._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                known |= {o for a in sub._actions for o in a.option_strings}
    scripts = ["extract_fts.py", "match_fts.py", "bench.py", "bench_match.py", "bench_pack_plan.py"]
    scripts += ["bench_stores.py", "bench_serve.py", "bench_models.py", "bench_grow.py", "gpu_check.py"]
    scripts += ["make_features.py", "bench_index.py", "bench_interop.py", "bench_scale.py"]
    helps = [[sys.executable, str(ROOT / "tools" / s), "--help"] for s in scripts]
    helps.append([sys.executable, "-m", "torch.distributed.run", "--help"])
    helps.append([sys.executable, str(ROOT / "tools" / "make_sample_images.py"), "--help"])
    for cmd in helps:
        out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, check=True).stdout
        known |= set(re.findall(r"--[a-z][a-z0-9_-]*", out))
    shown = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9_-]*", (ROOT / "README.md").read_text()))
    assert shown and not shown - known, sorted(shown - known)
