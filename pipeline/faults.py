"""A test-only switch that kills the process at a named point, to prove that a rerun (or a
torchrun restart) recovers. Off unless FEATPIPE_TEST_CRASH is set; costs one dict lookup.

  FEATPIPE_TEST_CRASH=after-chunk      die (SIGKILL) right after this rank commits its first chunk
  FEATPIPE_TEST_CRASH=consolidate      die after fts.npy is published, before fts.pth
  FEATPIPE_TEST_CRASH=after-block      (match) die right after this rank commits its first query block
  FEATPIPE_TEST_CRASH=after-shard      (pack) die right after this rank commits its first shard
  FEATPIPE_TEST_CRASH=update-block     (match --update) die once the first new block is written
  FEATPIPE_TEST_CRASH=index-written    (index --update) die after the new index file, before index.json
  FEATPIPE_TEST_CRASH=dedup-grown      (dedup) die after the grown lists are saved, before the groups
  FEATPIPE_TEST_CRASH_RANK=N           only on rank N (default 0)
  FEATPIPE_TEST_CRASH_ONCE=FILE        only if FILE does not exist yet; it is created first
"""

from __future__ import annotations

import os
import signal


def crash_point(point: str, rank: int = 0) -> None:
    if os.environ.get("FEATPIPE_TEST_CRASH") != point:
        return
    if rank != int(os.environ.get("FEATPIPE_TEST_CRASH_RANK", "0")):
        return
    once = os.environ.get("FEATPIPE_TEST_CRASH_ONCE")
    if once:
        if os.path.exists(once):
            return
        open(once, "w").close()
    os.kill(os.getpid(), signal.SIGKILL)
