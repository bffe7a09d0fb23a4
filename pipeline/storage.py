"""fsspec helpers: one place that knows how local folders and object stores differ.

Every write that others may read goes through `commit_*`: a local file is written under a
temporary name and renamed; an object store makes an object visible only when its upload is
complete, so one put is already atomic there.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import fsspec
from fsspec.implementations.local import LocalFileSystem

from pipeline.errors import UserError, first_line

log = logging.getLogger("featpipe")
T = TypeVar("T")


@dataclass(frozen=True)
class Location:
    """A folder or object prefix, local or remote."""

    fs: fsspec.AbstractFileSystem
    path: str

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, LocalFileSystem)

    def join(self, *parts: str) -> str:
        return "/".join([self.path.rstrip("/"), *parts])

    def url(self, path: str | None = None) -> str:
        """The path as a user recognises it: a plain path locally, protocol://… remotely."""
        p = self.path if path is None else path
        return p if self.is_local else self.fs.unstrip_protocol(p)


STREAM_BLOCK = 8 << 20  # bytes per read-ahead request when streaming a shard


def open_stream(url: str):
    """A file to read from start to end (a tar shard), with plain read-ahead on every backend.
    gcsfs ≥ 2026 otherwise picks an adaptive background prefetcher, which hung for good in the
    middle of a shard (seen with 3 shards against a GCS emulator, even with no worker processes).
    `pipe:COMMAND` (webdataset's convention) runs COMMAND in a shell and reads its output."""
    if url.startswith(PIPE):
        return PipeStream(url[len(PIPE) :])
    fs, path = fsspec.core.url_to_fs(url)  # fsspec.open's keywords would go to the filesystem, not the file
    return fs.open(path, "rb", cache_type="readahead", block_size=STREAM_BLOCK)


PIPE = "pipe:"


class PipeStream:
    """The standard output of a shell command, as a file read to its end; a command that fails
    (exits non-zero) raises OSError with the first line it printed on stderr, when closed after
    its output ran out (a shard closed early stops the command instead)."""

    def __init__(self, command: str):
        self.command = command
        self.proc = subprocess.Popen(command, shell=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.finished = False

    def read(self, size: int = -1) -> bytes:
        data = self.proc.stdout.read(size)
        self.finished = self.finished or not data or size < 0
        return data

    def __enter__(self) -> PipeStream:
        return self

    def __exit__(self, *_) -> None:
        if not self.finished:
            self.proc.kill()
        self.proc.stdout.close()
        err = self.proc.stderr.read().decode(errors="replace").strip().splitlines()
        self.proc.stderr.close()
        code = self.proc.wait()
        if self.finished and code != 0:  # the command's own failure says more than the tar reader's
            raise OSError(f"pipe command exited {code}: {err[0] if err else self.command}")


# A store that throttles (503 SlowDown) or drops connections for longer than the client's own few
# retries: writes are tried again this many times, with exponential backoff from WRITE_BACKOFF_S.
WRITE_RETRIES = 5
WRITE_BACKOFF_S = 0.25
# s3fs (aiobotocore) keeps 10 connections per client unless told: more reads in flight than that
# just queue (readmany.py keeps up to 64 per process in flight).
S3_POOL_CONNECTIONS = 128


def locate(url: str, **storage_options: Any) -> Location:
    if url.split("://", 1)[0] in ("s3", "s3a") and "config_kwargs" not in storage_options:
        storage_options["config_kwargs"] = {"max_pool_connections": S3_POOL_CONNECTIONS}
    try:
        fs, path = fsspec.core.url_to_fs(url, **storage_options)
    except (ImportError, ValueError) as exc:
        raise UserError(f"cannot open {url!r}: {exc}") from None
    if isinstance(fs, LocalFileSystem):
        path = os.path.abspath(path)
    return Location(fs, path.rstrip("/") or "/")


def ensure_writable(loc: Location, create_bucket: bool = False) -> None:
    """Create the folder and prove we can write there, before any real output exists. A bucket
    that does not exist is a typo unless `create_bucket` (--create-bucket) says otherwise."""
    check_bucket(loc, create_bucket)
    probe = loc.join(f".featpipe-write-test-{uuid.uuid4().hex}")
    created = loc.is_local and not os.path.isdir(loc.path)
    try:
        for attempt in range(5):
            try:
                loc.fs.makedirs(loc.path, exist_ok=True)
                loc.fs.pipe_file(probe, b"")
                break
            except (FileExistsError, FileNotFoundError):  # another rank makes or removes the folder now
                if attempt == 4:
                    raise
        loc.fs.rm_file(probe)
    except Exception as exc:  # every backend raises its own type
        raise UserError(f"cannot write to {loc.url()}: {exc}") from None
    if created:  # leave no trace until real output exists: a later check may still fail
        try:
            os.rmdir(loc.path)
        except OSError:  # not empty: another rank (torchrun) is checking or writing there too
            pass


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _publishable(tmp: str) -> None:
    """mkstemp makes 0600 files; published outputs get the permissions a plain open() would."""
    os.chmod(tmp, 0o666 & ~_umask())


def commit_bytes(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    if isinstance(fs, LocalFileSystem):
        folder = os.path.dirname(path)
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix="-" + os.path.basename(path))
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            _publishable(tmp)
            os.replace(tmp, path)
        except BaseException:
            remove_quietly(tmp)
            raise
    else:  # one put: the object appears whole or not at all, so a retry is safe
        retrying(lambda: fs.pipe_file(path, data), WRITE_RETRIES, WRITE_BACKOFF_S, f"write {fs.unstrip_protocol(path)}")


def commit_json(fs: fsspec.AbstractFileSystem, path: str, obj: Any) -> None:
    commit_bytes(fs, path, json_bytes(obj))


def json_bytes(obj: Any) -> bytes:
    return utf8_json(obj, indent=1) + b"\n"


def utf8_json(obj: Any, **kwargs: Any) -> bytes:
    """Sorted JSON as UTF-8; text with a lone surrogate (a file name that is not valid UTF-8, as
    Python decodes it) is written with \\u escapes instead, so the name survives losslessly."""
    try:
        return json.dumps(obj, sort_keys=True, ensure_ascii=False, **kwargs).encode()
    except UnicodeEncodeError:
        return json.dumps(obj, sort_keys=True, ensure_ascii=True, **kwargs).encode()


OBJECT_STORES = ("s3", "s3a", "gs", "gcs", "az", "abfs", "abfss")


def check_bucket(loc: Location, create: bool) -> None:
    """A bucket that does not exist is a typo until the user says otherwise (--create-bucket)."""
    protocols = loc.fs.protocol if isinstance(loc.fs.protocol, tuple) else (loc.fs.protocol,)
    if loc.is_local or not set(protocols) & set(OBJECT_STORES):
        return
    bucket = loc.path.strip("/").split("/", 1)[0]
    try:
        exists = loc.fs.exists(bucket)
    except Exception as exc:  # every backend raises its own type
        raise UserError(f"cannot reach {loc.url()}: {first_line(exc)}") from None
    if not exists:
        if not create:
            raise UserError(
                f"bucket {bucket!r} does not exist ({loc.url()}); check the name, or pass --create-bucket to create it"
            )
        loc.fs.mkdir(bucket)


# A missing or forbidden target: the same answer would come again, so it is not retried.
UNREADABLE = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)


def retrying(fn: Callable[[], T], retries: int, backoff_s: float, what: str) -> T:
    """fn(), again after a transient failure (exponential backoff); a missing or forbidden target fails at once."""
    for attempt in range(retries + 1):
        try:
            return fn()
        except (UserError, *UNREADABLE):
            raise
        except Exception as exc:
            if attempt == retries:
                raise
            log.warning("%s: %s; retry %d of %d", what, first_line(exc), attempt + 1, retries)
            time.sleep(backoff_s * 2**attempt)
    raise AssertionError("unreachable")


def read_json(fs: fsspec.AbstractFileSystem, path: str) -> Any:
    with fs.open(path, "rb") as f:
        return json.loads(f.read())


def read_valid_json(fs: fsspec.AbstractFileSystem, path: str, remedy: str, keys: tuple[str, ...] = ()) -> Any:
    """read_json for a file featpipe wrote and a user may have damaged: not JSON, or an object
    without `keys`, is one line naming the file and what to do."""
    try:
        data = read_json(fs, path)
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError both are
        raise UserError(f"{path} is damaged (not valid JSON: {first_line(exc)}); {remedy}") from None
    if keys and (not isinstance(data, dict) or not set(keys) <= set(data)):
        raise UserError(f"{path} is damaged (not the record featpipe wrote); {remedy}")
    return data


def staging_file(fs: fsspec.AbstractFileSystem, final_path: str) -> str:
    """A local temporary path to build a large file in before `commit_file` publishes it."""
    folder = os.path.dirname(final_path) if isinstance(fs, LocalFileSystem) else None
    if folder:
        os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix="-" + os.path.basename(final_path))
    os.close(fd)
    return tmp


def commit_file(fs: fsspec.AbstractFileSystem, staged: str, final_path: str) -> None:
    try:
        if isinstance(fs, LocalFileSystem):
            _publishable(staged)
            os.replace(staged, final_path)
        else:
            what = f"upload {fs.unstrip_protocol(final_path)}"
            retrying(lambda: fs.put_file(staged, final_path), WRITE_RETRIES, WRITE_BACKOFF_S, what)
    finally:
        remove_quietly(staged)


def remove_stale_temps(loc: Location, *subdirs: str) -> None:
    """Temporary files a killed run left behind (local folders only: object stores have none).
    Call only while no other process writes there."""
    if not loc.is_local:
        return
    for sub in ("", *subdirs):
        folder = os.path.join(loc.path, sub)
        if os.path.isdir(folder):
            for name in os.listdir(folder):
                if name.startswith(".tmp-"):
                    remove_quietly(os.path.join(folder, name))


def remove_quietly(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def cache_root() -> str:
    return os.environ.get("FEATPIPE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "featpipe")


def local_copy(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """A local copy of a file on a store, downloaded once and reused while the object is the same
    (size and ETag / generation / mtime): the retrieval verbs read features in random row order
    (exact re-scoring gathers N × (k + 3) rows), which ranged reads would turn into a request per
    row. The copy lives under $FEATPIPE_CACHE (default ~/.cache/featpipe) and takes the file's size."""
    info = retrying(lambda: fs.info(path), 3, 0.5, f"stat {path}")
    url = fs.unstrip_protocol(path)
    stamp = json.dumps(
        {
            "url": url,
            **{k: str(info[k]) for k in ("size", "ETag", "etag", "generation", "mtime", "LastModified") if k in info},
        },
        sort_keys=True,
    )
    folder = os.path.join(cache_root(), hashlib.sha256(url.encode()).hexdigest()[:32])
    data, meta = os.path.join(folder, "data"), os.path.join(folder, "source.json")
    try:
        with open(meta, encoding="utf-8") as f:
            if f.read() == stamp and os.path.getsize(data) == int(info.get("size") or 0):
                return data
    except OSError:
        pass
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-")
    os.close(fd)
    try:
        log.info("copying %s to the local cache %s (%d bytes)", url, folder, int(info.get("size") or 0))
        retrying(lambda: fs.get_file(path, tmp), 3, 1.0, f"download {url}")
        os.replace(tmp, data)
    finally:
        remove_quietly(tmp)
    commit_bytes(LocalFileSystem(), meta, stamp.encode())
    return data


def npy_appender(path: str, dtype: str, shape: tuple[int, ...]):
    """`path` opened to write an array of `shape` with plain appends after its .npy header (the
    header np.save and open_memmap write): the bytes of filling a memory map, without the map's
    written pages counted in the process (filling fts.npy for 50M × 64 through one held 8.4 GB
    resident; rows/ through maps, 1.2 GB at 10M rows). The caller closes it."""
    import numpy as np

    f = open(path, "wb")  # noqa: SIM115  (the caller closes it)
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": shape}
    np.lib.format.write_array_header_1_0(f, header)
    return f
