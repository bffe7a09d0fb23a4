"""`featpipe serve` (issue 20): a real server process on loopback (--port 0), its answers against
`featpipe query`'s, every bad input answered with its status and one message, batching under
concurrent image queries, and the page in a real headless Chromium."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import zlib
from pathlib import Path

import numpy as np
import pytest
from conftest import PHOTOS, ROOT, run_cli

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

MODEL = ["--model-repo", str(ROOT / "pipeline" / "hub"), "--model-name", "vit_tiny_p14", "--no-progress"]
HOSTILE = "<img src=x onerror=alert(1)>.jpg"


@pytest.fixture(scope="module")
def features(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("serve")
    src = base / "images"
    src.mkdir()
    for i, photo in enumerate(PHOTOS):
        (src / f"p{i}.jpg").write_bytes(photo)
    (src / HOSTILE).write_bytes(PHOTOS[0])
    run_cli("extract", src, base / "features", *MODEL, "--workers", "0")
    return base / "features"


class Server:
    def __init__(self, target: Path, *flags: str):
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
        cmd = [sys.executable, "-m", "pipeline", "serve", str(target), "--port", "0", "--device", "cpu", *flags]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        line = self.proc.stdout.readline()
        assert " on http://127.0.0.1:" in line, line + self.proc.stderr.read()
        self.url = line.split(" on ", 1)[1].split(" ", 1)[0]
        for _ in range(600):
            if self.get("/healthz")[0] == 200:
                break
            time.sleep(0.1)
        else:
            raise AssertionError("never ready")

    def request(self, path: str, data: bytes | None = None, headers: dict | None = None) -> tuple[int, dict]:
        req = urllib.request.Request(self.url + path, data=data, headers=headers or {})
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                body = r.read()
                return r.status, json.loads(body) if r.headers.get_content_type() == "application/json" else body
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    def get(self, path: str):
        try:
            return self.request(path)
        except urllib.error.URLError:
            return 0, {}

    def post_json(self, obj) -> tuple[int, dict]:
        return self.request("/api/search", json.dumps(obj).encode(), {"Content-Type": "application/json"})

    def post_image(self, data: bytes, query: str = "") -> tuple[int, dict]:
        boundary = "featpipetestboundary"
        body = (
            (
                f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="q.jpg"\r\n'
                "Content-Type: image/jpeg\r\n\r\n"
            ).encode()
            + data
            + f"\r\n--{boundary}--\r\n".encode()
        )
        return self.request("/api/search" + query, body, {"Content-Type": f"multipart/form-data; boundary={boundary}"})

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


@pytest.fixture(scope="module")
def server(features):
    s = Server(features, "--allow-urls")
    yield s
    s.stop()


def cli_hits(features: Path, query) -> list[tuple[int, float]]:
    out = run_cli("query", features, query, "-k", "5", "--json").stdout
    return [(json.loads(ln)["row"], round(json.loads(ln)["score"], 5)) for ln in out.splitlines()]


def api_hits(body: dict) -> list[tuple[int, float]]:
    return [(h["row"], round(h["score"], 5)) for h in body["hits"]]


def test_answers_equal_featpipe_query(server, features, tmp_path):
    (tmp_path / "q.jpg").write_bytes(PHOTOS[2])
    status, body = server.post_image(PHOTOS[2], "?k=5")
    assert status == 200 and api_hits(body) == cli_hits(features, tmp_path / "q.jpg")
    key = json.loads((features / "img_list.json").read_text())[3]
    status, body = server.post_json({"key": key, "k": 5})
    assert status == 200 and api_hits(body) == cli_hits(features, key)
    vec = np.asarray(__import__("torch").load(features / "fts.pth"))[4]
    np.save(tmp_path / "v.npy", vec[None])
    status, body = server.post_json({"vector": vec.tolist(), "k": 5})
    assert status == 200 and api_hits(body) == cli_hits(features, tmp_path / "v.npy")
    status, body = server.request("/api/search?row=3&k=2&offset=1")
    assert status == 200 and [h["rank"] for h in body["hits"]] == [1, 2]
    status, info = server.request("/api/info")
    assert info["n"] == len(PHOTOS) + 1 and info["image_queries"] and not info["text_queries"]
    status, thumb = server.request(body["hits"][0]["thumb"])
    assert status == 200 and thumb[:2] == b"\xff\xd8"


def png_bomb() -> bytes:
    """A valid PNG header claiming 20000 × 20000 pixels: a few hundred bytes."""
    import struct

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", 20000, 20000, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 100)) + chunk(b"IEND", b"")
    )


BAD = [
    ("empty", lambda s: s.post_image(b""), 422, "empty"),
    ("truncated", lambda s: s.post_image(PHOTOS[0][:300]), 422, "not_an_image"),
    ("not_an_image", lambda s: s.post_image(b"just some text"), 422, "not_an_image"),
    ("bomb", lambda s: s.post_image(png_bomb()), 413, "too_many_pixels"),
    ("30MB", lambda s: s.post_image(b"\xff" * (30 << 20)), 413, "too_large"),
    ("huge_k", lambda s: s.post_json({"row": 1, "k": 10**9}), 422, "bad_k"),
    ("wrong_length", lambda s: s.post_json({"vector": [1.0, 2.0]}), 422, "bad_vector"),
    ("unknown_row", lambda s: s.request("/api/search?row=99999"), 404, "unknown_row"),
    ("file_url", lambda s: s.post_json({"url": "file:///etc/passwd"}), 400, "url_forbidden"),
    ("loopback_url", lambda s: s.post_json({"url": s.url + "/api/info"}), 400, "url_forbidden"),
    ("private_url", lambda s: s.post_json({"url": "http://10.1.2.3/x.jpg"}), 400, "url_forbidden"),
    ("no_text_tower", lambda s: s.post_json({"text": "a cat"}), 422, "no_text_model"),
    ("media_type", lambda s: s.request("/api/search", b"x", {"Content-Type": "text/plain"}), 415, "unsupported"),
]


@pytest.mark.parametrize("case", [b[0] for b in BAD])
def test_bad_input_gets_its_status_and_one_message(case, server):
    _, send, status, code = next(b for b in BAD if b[0] == case)
    got, body = send(server)
    assert got == status and body["error"]["code"].startswith(code), (got, body)
    assert body["error"]["message"] and "\n" not in body["error"]["message"]
    assert server.request("/api/search?row=0&k=1")[1]["hits"][0]["row"] == 0  # still answering


def test_urls_are_off_unless_allowed_and_batches_form_under_load(features):
    s = Server(features, "--max-batch", "8", "--batch-wait-ms", "20")
    try:
        status, body = s.post_json({"url": "https://example.com/cat.jpg"})
        assert status == 400 and body["error"]["code"] == "urls_disabled"
        results = []
        threads = [threading.Thread(target=lambda: results.append(s.post_image(PHOTOS[1]))) for _ in range(12)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert all(r[0] == 200 for r in results) and len({json.dumps(r[1]) for r in results}) == 1
        metrics = s.request("/metrics")[1].decode()
        count = float(next(ln for ln in metrics.splitlines() if ln.startswith("featpipe_batch_size_count")).split()[-1])
        assert count < 12  # some image queries shared a model call
        assert 'featpipe_queries_total{kind="image"} 12' in metrics
    finally:
        s.stop()


def chrome(tmp_path: Path):
    """Debian's headless Chromium through its chromedriver (skipped where neither is installed)."""
    if not shutil.which("chromedriver") or not shutil.which("chromium"):
        pytest.skip("no chromium-driver here (.ci/run installs Debian's chromium and chromium-driver)")
    webdriver = pytest.importorskip("selenium.webdriver")
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--window-size=1280,1024",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={tmp_path / 'u'}",
    ):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=webdriver.ChromeService(shutil.which("chromedriver")), options=options)


def test_the_page_in_a_real_browser(server, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver = chrome(tmp_path)
    try:
        driver.get(server.url + "/")
        WebDriverWait(driver, 30).until(lambda d: "images" in d.find_element(By.ID, "info").text)
        (tmp_path / "query.jpg").write_bytes(PHOTOS[0])
        driver.find_element(By.ID, "file").send_keys(str(tmp_path / "query.jpg"))
        figures = WebDriverWait(driver, 60).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#grid figure"))
        decoded = lambda d: d.execute_script(
            "return [...document.querySelectorAll('#grid img')].filter(i => i.complete && i.naturalWidth > 0).length"
        )
        WebDriverWait(driver, 30).until(lambda d: decoded(d) == len(d.find_elements(By.CSS_SELECTOR, "#grid img")))
        captions = [f.text for f in driver.find_elements(By.CSS_SELECTOR, "#grid figcaption")]
        assert any(HOSTILE in c for c in captions)  # shown as text …
        assert driver.execute_script("return document.querySelectorAll('#grid img[src=x]').length") == 0  # … not HTML
        second = figures[-1].get_attribute("data-row")  # not the query's byte copy, which ties with it
        figures[-1].click()
        WebDriverWait(driver, 30).until(lambda d: d.current_url.endswith(f"#row={second}"))
        first_row = "return document.querySelector('#grid figure')?.dataset.row"  # read in one step: the
        WebDriverWait(driver, 30).until(lambda d: d.execute_script(first_row) == second)  # grid is re-rendered
        errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        assert not errors, errors
    finally:
        driver.quit()


def test_a_running_service_loads_an_index_update(tmp_path):
    """Datasets that grow (issue 21) under a running service: features that grew before the index
    is updated leave the loaded index serving; `index --update` is picked up without a restart,
    with the new rows found and the removed one never returned."""
    from conftest import noisy_photo

    from pipeline import api

    hub, src, work = str(ROOT / "pipeline" / "hub"), tmp_path / "src", tmp_path / "work"
    src.mkdir()
    for i in range(6):
        (src / f"m{i}.jpg").write_bytes(noisy_photo(i))

    def grow() -> None:
        api.pack(src, work / "shards", shard_size=4, relist=True, progress=False)
        api.extract(work / "shards", work / "out", model="tiny_cnn", repo=hub, workers=0, progress=False)

    grow()
    api.index(work / "out", work / "index", index_key="Flat", progress=False)
    s = Server(work / "index", "--reload-every", "1")
    try:
        assert s.request("/api/info")[1]["n"] == 6
        (src / "n1.jpg").write_bytes(noisy_photo(11))
        (src / "n2.jpg").write_bytes(noisy_photo(12))
        (src / "m1.jpg").unlink()
        grow()  # the features hold 8 rows, row 1 removed; the index still 6: it cannot load yet
        time.sleep(2.5)
        status, info = s.request("/api/info")
        assert status == 200 and (info["n"], info["reloads"]) == (6, 0)
        api.index(work / "out", work / "index", index_key="Flat", progress=False, update=True)
        for _ in range(100):
            if s.request("/api/info")[1]["reloads"]:
                break
            time.sleep(0.1)
        status, info = s.request("/api/info")
        assert (info["n"], info["reloads"], info["generation"]) == (8, 1, 1)
        vectors = np.load(work / "out" / "fts.npy").astype(np.float32)
        np.save(tmp_path / "q.npy", vectors[[1, 6]])
        expected = [(h.row, round(h.score, 5)) for h in api.query(work / "index", tmp_path / "q.npy", k=7)]
        got = [s.post_json({"vector": vectors[r].tolist(), "k": 7})[1] for r in (1, 6)]
        assert [hit for body in got for hit in api_hits(body)] == expected
        assert {row for row, _ in expected} == {0, 2, 3, 4, 5, 6, 7}  # the new rows found, row 1 never
    finally:
        s.stop()
    assert "still serving the loaded one" in s.proc.stderr.read()
