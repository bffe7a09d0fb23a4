#!/usr/bin/env python3
"""`make bench` for the LAION toolchain's commands on featpipe's outputs (README "Using the outputs
elsewhere"): `featpipe extract` with and without --normalize over the same synthetic photos, then
the README's `autofaiss build_index --embeddings OUT … --metric_type ip` on each, and recall@10 of
autofaiss's index against exact cosine (what featpipe's own verbs rank by) on sampled rows.

    python tools/bench_interop.py [--images 3000]

autofaiss runs in its own venv (bench-out/autofaiss-venv, made by the Makefile: its pins clash
with ours); without it the script says so and stops.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "bench-out" / "interop"
VENV = ROOT / "bench-out" / "autofaiss-venv" / "bin"
MODEL = ["--model-repo", str(ROOT / "pipeline" / "hub"), "--model-name", "tiny_cnn", "--no-progress"]
K = 10


def photos(folder: Path, count: int) -> None:
    """Deterministic small JPEGs: a few hundred scenes of colour blocks, each seen with noise."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        path = folder / f"{i:06d}.jpg"
        if path.exists():
            continue
        scene = np.random.default_rng(i % 300).integers(0, 255, (6, 8, 3)).repeat(16, 0).repeat(16, 1)
        noisy = scene + np.random.default_rng(i).normal(0, 30, scene.shape)
        buf = io.BytesIO()
        Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=85)
        path.write_bytes(buf.getvalue())


def recall_of_autofaiss(out: Path, queries: np.ndarray) -> float:
    """The README's autofaiss command on OUT, then recall@10 against exact cosine."""
    index = out / "autofaiss"
    index.mkdir(exist_ok=True)
    cmd = [str(VENV / "autofaiss"), "build_index", "--embeddings", str(out), "--index_path", str(index / "knn.index")]
    cmd += ["--index_infos_path", str(index / "infos.json"), "--metric_type", "ip"]
    subprocess.run(cmd, check=True, capture_output=True)
    fts = np.load(out / "fts.npy").astype(np.float32)
    unit = fts / np.linalg.norm(fts, axis=1, keepdims=True)
    truth = np.argsort(-(unit[queries] @ unit.T), axis=1)[:, :K]
    code = (
        "import sys, faiss, numpy as np; ix = faiss.read_index(sys.argv[1]); x = np.load(sys.argv[2]).astype('f4');"
        f"np.save(sys.argv[3], ix.search(x[np.load(sys.argv[4])], {K})[1])"
    )
    np.save(index / "queries.npy", queries)
    args = [str(index / "knn.index"), str(out / "fts.npy"), str(index / "found.npy"), str(index / "queries.npy")]
    subprocess.run([str(VENV / "python"), "-c", code, *args], check=True)
    found = np.load(index / "found.npy")
    return float(np.mean([len(np.intersect1d(a, b)) / K for a, b in zip(found, truth, strict=True)]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=3000)
    args = ap.parse_args()
    if not (VENV / "autofaiss").exists():
        sys.exit(f"autofaiss not found at {VENV}: `make bench` makes its venv")
    src = WORK / f"photos-{args.images}"
    photos(src, args.images)
    rows = np.sort(np.random.default_rng(7).choice(args.images, min(500, args.images), replace=False))
    report = {"machine": f"{platform.machine()}, {os.cpu_count()} cores", "images": args.images, "runs": []}
    for label, flags in (("plain", []), ("--normalize", ["--normalize"])):
        out = WORK / f"out-{label.strip('-')}-{args.images}"
        cmd = [sys.executable, "-m", "pipeline", "extract", str(src), str(out), *MODEL, *flags, "--overwrite"]
        subprocess.run(cmd, check=True, capture_output=True)
        norms = np.linalg.norm(np.load(out / "fts.npy").astype(np.float32), axis=1)
        run = {"extract": label, "norms": [round(float(norms.min()), 3), round(float(norms.max()), 3)]}
        run["autofaiss_recall_at_10"] = round(recall_of_autofaiss(out, rows), 4)
        report["runs"].append(run)
    (WORK / "result.json").write_text(json.dumps(report, indent=1))
    print(f"# {args.images} synthetic photos, tiny_cnn, {report['machine']}")
    print("| extract | vector norms | autofaiss (--metric_type ip) recall@10 against cosine |")
    for r in report["runs"]:
        print(f"| {r['extract']} | {r['norms'][0]}–{r['norms'][1]} | {r['autofaiss_recall_at_10']} |")


if __name__ == "__main__":
    main()
