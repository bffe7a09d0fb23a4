"""`featpipe serve` under a hostile probe (issue 27): malformed numbers and JSON, extreme vectors,
stalled and vanishing clients, foreign Host headers, conditional thumbnails, a wrong path, and a
URL that drips its bytes. A real server process on loopback, raw sockets where HTTP clients would
hide what is being tested."""

from __future__ import annotations

import http.server
import json
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from test_serve import Server, features  # noqa: F401  (the module's features fixture)

pytest.importorskip("starlette")


@pytest.fixture(scope="module")
def server(features):  # noqa: F811
    s = Server(features, "--read-timeout", "1")
    yield s
    s.stop()


def _raw(server: Server, payload: bytes, wait_s: float = 0.0) -> tuple[bytes, float]:
    """Send bytes on a fresh connection; what came back and after how long the server closed it."""
    host, port = server.url.split("//", 1)[1].split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        started = time.monotonic()
        sock.sendall(payload)
        time.sleep(wait_s)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
        return answer, time.monotonic() - started


@pytest.mark.parametrize(
    "query,status",
    [("?row=1&k=%C2%B2", 422), ("?row=1&k=--1", 422), ("?row=%C2%B2", 404), ("?row=1&offset=1e3", 422)],
)
def test_odd_numbers_in_a_query_string_are_4xx(server, query, status):
    got, body = server.request("/api/search" + query)
    assert got == status and body["error"]["message"], body


def test_odd_json_is_4xx_and_counted(server):
    assert server.post_json({"row": True})[0] == 404  # true is not row 1
    dim = server.request("/api/info")[1]["dim"]
    status, body = server.post_json({"vector": [[0.5] * (dim // 2), [0.5] * (dim // 2)]})
    assert status == 422 and body["error"]["code"] == "bad_vector"  # two half vectors are not one
    deep = b"[" * 100_000 + b"]" * 100_000
    status, body = server.request("/api/search", deep, {"Content-Type": "application/json"})
    assert status == 400 and body["error"]["code"] == "bad_json"
    metrics = server.request("/metrics")[1].decode()
    assert 'featpipe_errors_total{code="bad_json"}' in metrics and 'code="bad_vector"' in metrics


def test_extreme_vectors_rank_like_their_direction(server, features):  # noqa: F811
    row = np.load(features / "fts.npy").astype(np.float64)[3]
    direction = np.sign(row)  # every component ±1: scaled to 3e38 or 1e-45 it keeps its direction
    want = [h["row"] for h in server.post_json({"vector": direction.tolist(), "k": 3})[1]["hits"]]
    for scale in (3e38, 1e-45):
        status, body = server.post_json({"vector": (direction * scale).tolist(), "k": 3})
        assert status == 200 and [h["row"] for h in body["hits"]] == want, scale


def test_thumbnail_etag_is_quoted_and_honoured(server):
    status, _ = server.request("/api/thumb/0")
    assert status == 200
    import urllib.request

    with urllib.request.urlopen(server.url + "/api/thumb/0") as r:
        etag = r.headers["ETag"]
    assert etag.startswith('"') and etag.endswith('"')
    req = urllib.request.Request(server.url + "/api/thumb/0", headers={"If-None-Match": etag})
    try:
        urllib.request.urlopen(req)
        raise AssertionError("expected 304")
    except urllib.error.HTTPError as exc:
        assert exc.code == 304


def test_a_foreign_host_header_is_refused(server):
    port = server.url.rsplit(":", 1)[1]
    answer, _ = _raw(
        server, f"GET /api/info HTTP/1.1\r\nHost: evil.example:{port}\r\nConnection: close\r\n\r\n".encode()
    )
    assert answer.startswith(b"HTTP/1.1 400")
    answer, _ = _raw(server, f"GET /api/info HTTP/1.1\r\nHost: localhost:{port}\r\nConnection: close\r\n\r\n".encode())
    assert answer.startswith(b"HTTP/1.1 200")


def test_stalled_clients_are_closed(server):
    """--read-timeout 1: half a request line, or a body that stops, holds no connection for long."""
    answer, held = _raw(server, b"GET /api/info HTTP/1.1\r\nHost: loc")
    assert answer == b"" and held < 5
    body = b'{"row": 1, "k": 2}'
    head = (
        "POST /api/search HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: 500\r\n\r\n"
    )
    answer, held = _raw(server, head.encode() + body)
    assert answer.startswith(b"HTTP/1.1 408") and held < 5, answer[:200]


def test_a_client_hanging_up_mid_upload_is_no_traceback(features, tmp_path):  # noqa: F811
    s = Server(features)
    try:
        head = (
            "POST /api/search HTTP/1.1\r\nHost: localhost\r\nContent-Type: image/jpeg\r\nContent-Length: 100000\r\n\r\n"
        )
        host, port = s.url.split("//", 1)[1].split(":")
        for _ in range(3):
            with socket.create_connection((host, int(port))) as sock:
                sock.sendall(head.encode() + b"\xff\xd8" + b"\0" * 1000)
            time.sleep(0.3)
        assert s.request("/api/search?row=0&k=1")[0] == 200
    finally:
        s.stop()
    log = s.proc.stderr.read()
    assert "Traceback" not in log and "featpipe: ready: " in log and "Warning" not in log, log[-2000:]


def test_a_path_that_is_not_an_index_exits_before_listening(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline", "serve", str(tmp_path / "missing"), "--port", "0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 1 and "Traceback" not in proc.stderr and " on http://" not in proc.stdout
    assert proc.stderr.strip().splitlines()[-1].startswith("featpipe serve: error: ")


class _Drip(http.server.BaseHTTPRequestHandler):
    """An image server that sends one byte every 0.3 s, for ever (each read's own timeout is met)."""

    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.end_headers()
        try:
            while True:
                self.wfile.write(b"\xff")
                self.wfile.flush()
                time.sleep(0.3)
        except OSError:
            pass

    def log_message(self, *args):
        pass


def test_a_dripping_url_is_given_up_at_the_deadline(features):  # noqa: F811
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Drip)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{httpd.server_address[1]}/slow.jpg"
        started = time.monotonic()
        proc = subprocess.run(
            [sys.executable, "-m", "pipeline", "query", str(features), url, "--timeout", "2"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        fetch_s = time.monotonic() - started
    finally:
        httpd.shutdown()
    assert proc.returncode == 1 and "timed out after 2 s" in proc.stderr, proc.stderr[-500:]
    assert fetch_s < 30, fetch_s  # start-up included; the drip alone would never end


def test_the_page_while_loading_with_enter_paging_and_the_query_shown(features, tmp_path):  # noqa: F811
    """Opened before the service is ready, the page waits for it; Enter searches by key when the
    model has no text tower; the query is shown; results page with offset; clicking a result
    clears the file input."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait
    from test_serve import PHOTOS, chrome

    driver = chrome(tmp_path)
    cmd = [sys.executable, "-m", "pipeline", "serve", str(features), "--port", "0", "--device", "cpu", "-k", "3"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url = proc.stdout.readline().split(" on ", 1)[1].split(" ", 1)[0]
        driver.get(url + "/")  # at once: the model is still loading
        wait = WebDriverWait(driver, 60)
        wait.until(lambda d: "images" in d.find_element(By.ID, "info").text)
        info = json.loads(driver.execute_script("return JSON.stringify(info)"))
        assert info["model"] == "hub/vit_tiny_p14"  # the local hub folder by its name, not its path here
        key = json.loads((features / "img_list.json").read_text())[2]
        box = driver.find_element(By.ID, "q")
        box.send_keys(key, Keys.ENTER)
        first = "return document.querySelector('#grid figure')?.dataset.row"
        wait.until(lambda d: d.execute_script(first) == "2")
        assert key in driver.find_element(By.ID, "query-text").text
        assert driver.find_element(By.ID, "page").text == "results 1–3"
        driver.find_element(By.ID, "next").click()
        wait.until(lambda d: d.find_element(By.ID, "page").text == "results 4–6")
        ranks = driver.execute_script(
            "return [...document.querySelectorAll('#grid figcaption')].map(c => c.textContent)"
        )
        assert all(" · #" in r for r in ranks) and "#3" in ranks[0]
        (tmp_path / "upload.jpg").write_bytes(PHOTOS[1])
        driver.find_element(By.ID, "file").send_keys(str(tmp_path / "upload.jpg"))
        wait.until(lambda d: "upload.jpg" in d.find_element(By.ID, "query-text").text)
        wait.until(lambda d: d.find_element(By.ID, "page").text == "results 1–3")
        row = driver.execute_script(first)
        driver.find_element(By.CSS_SELECTOR, "#grid figure:last-child").click()
        wait.until(lambda d: "row " in d.find_element(By.ID, "query-text").text)
        assert driver.execute_script("return document.getElementById('file').value") == ""
        assert row is not None
    finally:
        driver.quit()
        proc.terminate()
        proc.wait(10)
