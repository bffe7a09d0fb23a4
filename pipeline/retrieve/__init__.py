"""Retrieval over extracted features: match (all-vs-all kNN), dedup, index, query, show."""

from __future__ import annotations

from types import ModuleType

from pipeline.errors import UserError

# A flat search of at least this many queries goes through BLAS (one matrix product). faiss 1.15
# ships 128000, so a batch of 32 queries on 100k × 192 took the per-query path: 200 ms, against
# 36 ms through BLAS on this 2-core machine (the service's batches; all-vs-all blocks of thousands
# of queries cost the same either way). 20 is faiss's long-standing value.
BLAS_FROM_QUERIES = 20


def load_faiss() -> ModuleType:
    """faiss, or one line saying how to get it (it is an extra: the CPU and GPU wheels differ)."""
    try:
        import faiss
    except ImportError:
        raise UserError("this needs faiss: pip install 'featpipe[faiss]' (CPU) or 'featpipe[faiss-gpu]'") from None
    faiss.cvar.distance_compute_blas_threshold = BLAS_FROM_QUERIES
    return faiss
