"""`featpipe show`: the page is written, escaped, paginated, and renders in a real headless Chromium
with every thumbnail decoded. Also the retrieval chain on real images: dedup picks the largest copy."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, VALID, run_cli

MODEL = ["--model-repo", str(ROOT / "pipeline" / "hub"), "--model-name", "vit_tiny_p14", "--no-progress"]
HOSTILE = "<img src=x onerror=alert(1)>.jpg"


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    import io

    from PIL import Image

    d = tmp_path_factory.mktemp("show") / "images"
    d.mkdir()
    for i in range(1, 8):
        (d / f"b_photo{i}.jpg").write_bytes(VALID[f"photos/IMG_000{i}.jpg"])
    (d / HOSTILE).write_bytes(VALID["photos/IMG_0001.jpg"])  # a byte copy, under a hostile name
    small = Image.open(io.BytesIO(VALID["photos/IMG_0002.jpg"])).resize((188, 250))
    buf = io.BytesIO()
    small.save(buf, "JPEG", quality=95)
    (d / "a_small_copy.jpg").write_bytes(buf.getvalue())  # sorts first, but is the smaller copy
    return d


@pytest.fixture(scope="module")
def extracted(images, tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("show")
    run_cli("pack", images, base / "shards", "--shard-size", "3", "--no-progress")
    run_cli("extract", base / "shards", base / "out", *MODEL, "--workers", "0")
    return base / "out"


def test_dedup_groups_copies_with_the_largest_as_representative(extracted, images, tmp_path):
    run_cli("dedup", extracted, tmp_path / "d", "--threshold", "0.99", "-k", "4", "--no-progress")
    groups = json.loads((tmp_path / "d" / "groups.json").read_text())
    by_paths = {frozenset(Path(p).name for p in g["paths"]): g for g in groups}
    assert frozenset({"b_photo1.jpg", HOSTILE}) in by_paths
    resized = next(g for k, g in by_paths.items() if "a_small_copy.jpg" in k)
    assert Path(resized["paths"][0]).name == "b_photo2.jpg"  # 375x500 beats 188x250, though it sorts later
    removed = (tmp_path / "d" / "to_remove.txt").read_text().splitlines()
    assert str(images / "a_small_copy.jpg") in removed and str(images / "b_photo2.jpg") not in removed


def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if not path:
        pytest.skip("no chromium here (.ci/run installs Debian's chromium)")
    return path


def rendered(page: Path) -> str:
    """The page in headless Chromium, after load, with a probe the test adds to a copy of it: how
    many images the browser decoded (naturalWidth > 0), and how many there are."""
    probe = page.with_name("probe-" + page.name)
    script = (
        "<script>addEventListener('load',()=>{const i=[...document.images];"
        "document.body.dataset.total=i.length;"
        "document.body.dataset.decoded=i.filter(x=>x.complete&&x.naturalWidth>0).length})</script>"
    )
    probe.write_text(page.read_text().replace("</body>", script + "</body>"))
    out = subprocess.run(
        [
            chromium(),
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--virtual-time-budget=10000",
            "--dump-dom",
            probe.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def test_match_page_is_escaped_paginated_and_renders(extracted, tmp_path):
    run_cli("match", extracted, tmp_path / "m", "-k", "4", "--no-progress")
    proc = run_cli("show", tmp_path / "m", tmp_path / "pages" / "page.html", "--sample", "9", "--per-page", "4")
    pages = [tmp_path / "pages" / n for n in ("page.html", "page-2.html", "page-3.html")]
    assert "3 pages" in proc.stdout and all(p.exists() for p in pages)
    text = "".join(p.read_text() for p in pages)
    assert "<img src=x" not in text and "&lt;img src=x onerror=alert(1)&gt;.jpg" in text
    assert str(tmp_path) not in re.sub(r"<(title|h1)>.*?</\1>", "", text)  # no local path a browser would load
    dom = rendered(pages[0])
    total = int(re.search(r'data-total="(\d+)"', dom).group(1))
    decoded = int(re.search(r'data-decoded="(\d+)"', dom).group(1))
    assert total == 4 * 4 and decoded == total  # 4 queries × (query + 3 neighbours), every one decoded
    assert 'src="x"' not in dom and "b_photo" in dom


def test_dedup_page_shows_the_groups(extracted, tmp_path):
    run_cli("dedup", extracted, tmp_path / "d", "--threshold", "0.99", "-k", "4", "--no-progress")
    run_cli("show", tmp_path / "d", tmp_path / "dedup.html")
    text = (tmp_path / "dedup.html").read_text()
    assert text.count("group of 2") == 2 and "representative" in text
    dom = rendered(tmp_path / "dedup.html")
    assert re.search(r'data-total="4"', dom) and re.search(r'data-decoded="4"', dom)


def test_folder_mode_thumbnails_come_from_the_source_files(images, tmp_path):
    run_cli("extract", images, tmp_path / "out", *MODEL, "--workers", "0")
    run_cli("match", tmp_path / "out", tmp_path / "m", "-k", "2", "--no-progress")
    run_cli("show", tmp_path / "m", tmp_path / "p.html", "--thumb", "64")
    dom = rendered(tmp_path / "p.html")
    assert re.search(r'data-total="18"', dom) and re.search(r'data-decoded="18"', dom)


def test_show_bad_input_is_one_line(extracted, tmp_path):
    (tmp_path / "file").write_text("x")
    run_cli("match", extracted, tmp_path / "m", "-k", "2", "--no-progress")
    for args, expect in (
        ((tmp_path / "m", tmp_path / "file" / "p.html"), "cannot write"),
        ((tmp_path / "nothing", tmp_path / "p.html"), "not the output of"),
    ):
        proc = run_cli("show", *args, check=False)
        assert proc.returncode == 1 and expect in proc.stderr and "Traceback" not in proc.stderr
    copy = tmp_path / "features"
    shutil.copytree(extracted, copy)
    run_cli("match", copy, tmp_path / "m2", "-k", "2", "--no-progress")
    np.save(copy / "fts.npy", np.zeros_like(np.load(copy / "fts.npy")))
    proc = run_cli("show", tmp_path / "m2", tmp_path / "p.html", check=False)
    assert proc.returncode == 1 and "changed since this match" in proc.stderr


def test_no_deprecation_warning_along_the_demo_chain(extracted, tmp_path):
    """Warnings as errors (workers inherit PYTHONWARNINGS): device decode, match, dedup, show."""
    env = {"PYTHONWARNINGS": "error::DeprecationWarning"}
    shards = extracted.parent / "shards"
    proc = run_cli(
        "extract", shards, tmp_path / "f", *MODEL, "--decode", "device", "--workers", "1", env=env, check=False
    )
    assert proc.returncode in (0, 3) and "DeprecationWarning" not in proc.stderr, proc.stderr[-2000:]
    run_cli("match", tmp_path / "f", tmp_path / "m", "-k", "3", "--no-progress", env=env)
    run_cli("dedup", tmp_path / "f", tmp_path / "d", "--threshold", "0.99", "--no-progress", env=env)
    run_cli("show", tmp_path / "d", tmp_path / "p.html", env=env)
