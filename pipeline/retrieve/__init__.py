"""Retrieval over extracted features: match (all-vs-all kNN), dedup, index, query, show."""

from __future__ import annotations

from types import ModuleType

from pipeline.errors import UserError


def load_faiss() -> ModuleType:
    """faiss, or one line saying how to get it (it is an extra: the CPU and GPU wheels differ)."""
    try:
        import faiss
    except ImportError:
        raise UserError("this needs faiss: pip install 'featpipe[faiss]' (CPU) or 'featpipe[faiss-gpu]'") from None
    return faiss
