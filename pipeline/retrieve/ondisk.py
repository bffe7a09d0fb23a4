"""Inverted lists on disk (faiss's OnDiskInvertedLists: INDEX/index.ivfdata) merged and searched in
bounded memory. This module owns how featpipe writes that file and gives back the pages it maps.

Pages of a memory-mapped file count in a process's resident set (VmHWM, what GNU time and a
cgroup see) for as long as they stay mapped. faiss's `merge_ondisk` maps every part and the whole
output: at 50M × 64 (32-byte codes, 232 parts, 2 GB of lists) the build under a 512 MB budget
peaked at 4.2 GB. Here the parts are read with pread and the output written with pwrite, a group
of lists at a time (memory: the group, twice), into the same bytes and the same index header
(lists, slots, size) as merge_ondisk's. A search over mapped lists faults in each list it probes:
tuning's 1,000 queries at nprobe 16 over 8,192 lists touch most of them, so it searches in
batches and gives the pages back (madvise MADV_DONTNEED: the mapping is shared, nothing is lost).
A batch's size counts, per probed list, the list and the page-cache folio the kernel maps whole
around it (FOLIO_BYTES): counting the lists alone, tuning at 5M rows mapped 190 MB of a 200 MB
file in its batches of 64 MB, and the 50M build's tuning peaked at 826 MB (now 344 MB)."""

from __future__ import annotations

import ctypes
import os
import sys
from contextlib import contextmanager

import numpy as np

from pipeline.retrieve import load_faiss

GROUP_BYTES = 64 << 20  # output lists merged at a time
SEARCH_BYTES = 64 << 20  # list bytes a search batch may fault in before they are given back
# What probing one list maps beyond the list: the kernel maps a page-cache folio whole (Linux
# 6.18 here): one query probing one 0.4 MB list mapped 2 MB, 343 queries probing 298 lists
# (69 MB) mapped 191 MB, nearly all of a 200 MB .ivfdata, MADV_RANDOM or not.
FOLIO_BYTES = 2 << 20
ID_BYTES = 8  # faiss's idx_t beside each code
_MADV_DONTNEED = 4


def merge(index, part_files: list[str], ivfdata: str, group_bytes: int = GROUP_BYTES) -> None:
    """Every part's lists, in part order, into `ivfdata` as the lists of `index` (trained, empty)."""
    faiss = load_faiss()
    ivf = faiss.extract_index_ivf(index)
    code_size, entry = ivf.code_size, ivf.code_size + ID_BYTES
    sizes, firsts = _part_layouts(part_files, ivf.nlist)
    totals = sizes.sum(axis=0, dtype=np.int64)
    ends = np.cumsum(totals * entry)
    starts = ends - totals * entry
    lists = faiss.OnDiskInvertedLists(ivf.nlist, code_size, ivfdata)
    with quiet_stdout():
        lists.update_totsize(int(ends[-1]))  # the file at its size, mapped and never touched here
    held = totals.astype(np.uint64)  # named: swig_ptr keeps no reference to its array
    lists.set_all_lists_sizes(faiss.swig_ptr(held))
    at = firsts.copy()  # where each part's next list begins in its file
    with open(ivfdata, "r+b") as out:
        for lo, hi in _groups(ends - starts, group_bytes):
            group = np.zeros(int(ends[hi - 1] - starts[lo]), np.uint8)
            filled = np.zeros(hi - lo, np.int64)  # entries of each list written so far
            for p, name in enumerate(part_files):
                span = int(sizes[p, lo:hi].sum()) * entry
                with open(name, "rb") as f:
                    data = np.frombuffer(os.pread(f.fileno(), span, int(at[p])), np.uint8)
                at[p] += span
                _scatter(data, sizes[p, lo:hi], group, starts[lo:hi] - starts[lo], totals[lo:hi], filled, code_size)
            os.pwrite(out.fileno(), group.data, int(starts[lo]))
    index.ntotal = ivf.ntotal = int(totals.sum())
    ivf.replace_invlists(lists, True)
    lists.this.disown()


def _part_layouts(part_files: list[str], nlist: int) -> tuple[np.ndarray, np.ndarray]:
    """Each part's list sizes (parts × nlist, uint32: 228 MB for 870 parts of 65,536 lists) and
    where its first list begins in its file: a part's lists lie back to back, each its codes then
    its ids (faiss's "ilar" layout, which IO_FLAG_MMAP maps without reading)."""
    faiss = load_faiss()
    sizes = np.zeros((len(part_files), nlist), np.uint32)
    firsts = np.zeros(len(part_files), np.int64)
    for p, name in enumerate(part_files):
        held = faiss.read_index(name, faiss.IO_FLAG_MMAP)
        lists = faiss.extract_index_ivf(held).invlists
        sizes[p] = np.fromiter((lists.list_size(i) for i in range(nlist)), np.uint32, nlist)
        mapped = faiss.downcast_InvertedLists(lists)
        firsts[p] = int(mapped.get_codes(0)) - int(mapped.ptr)
        del held
    return sizes, firsts


def _groups(list_bytes: np.ndarray, most: int) -> list[tuple[int, int]]:
    """Runs of consecutive lists of at most `most` bytes together (a bigger list alone)."""
    groups, lo, size = [], 0, 0
    for i, b in enumerate(list_bytes.tolist()):
        if size and size + b > most:
            groups.append((lo, i))
            lo, size = i, 0
        size += b
    if lo < len(list_bytes):
        groups.append((lo, len(list_bytes)))
    return groups


def _scatter(data, counts, group, offsets, capacities, filled, code_size: int) -> None:
    """One part's run of lists (each its codes then its ids) into the output lists of the group."""
    read = 0
    for i in np.flatnonzero(counts).tolist():
        n = int(counts[i])
        codes, ids = data[read : read + n * code_size], data[read + n * code_size : read + n * (code_size + ID_BYTES)]
        read += n * (code_size + ID_BYTES)
        at = int(offsets[i]) + int(filled[i]) * code_size
        group[at : at + n * code_size] = codes
        at = int(offsets[i]) + int(capacities[i]) * code_size + int(filled[i]) * ID_BYTES
        group[at : at + n * ID_BYTES] = ids
        filled[i] += n


def search(index, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """index.search; over lists on disk, when the queries would fault in more than SEARCH_BYTES of
    lists (tuning, match), in batches that each fault in about that much, their pages given back
    after each. A few queries (a query, a service's request) keep what they mapped: giving it back
    would make the next one fault its lists in again."""
    faiss = load_faiss()
    ivf = faiss.try_extract_index_ivf(index)
    lists = faiss.downcast_InvertedLists(ivf.invlists) if ivf is not None else None
    if not isinstance(lists, faiss.OnDiskInvertedLists) or not lists.totsize:
        return index.search(queries, k)
    per_query = max(1, ivf.nprobe) * (lists.totsize / max(1, ivf.nlist) + FOLIO_BYTES)
    batch = max(1, int(SEARCH_BYTES // per_query))
    if len(queries) <= batch:
        return index.search(queries, k)
    scores, ids = [], []
    for start in range(0, len(queries), batch):
        found = index.search(queries[start : start + batch], k)
        give_back_pages(lists)
        scores.append(found[0])
        ids.append(found[1])
    return np.concatenate(scores), np.concatenate(ids)


def give_back_pages(lists) -> None:
    """The mapped lists' pages out of this process's resident set (the page cache keeps them)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise(ctypes.c_void_p(int(lists.ptr)), ctypes.c_size_t(lists.totsize), _MADV_DONTNEED)


@contextmanager
def quiet_stdout():
    """faiss prints on stdout when it resizes on-disk lists ("resizing … to N bytes") and when it
    finds them next to their index ("IO_FLAG_ONDISK_SAME_DIR: updating ondisk filename …"): that
    would corrupt `featpipe query --json` and the one line `index` prints, so stdout is shut."""
    sys.stdout.flush()
    saved, devnull = os.dup(1), os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)
        os.close(devnull)
