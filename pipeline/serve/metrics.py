"""Counters and histograms in Prometheus' text format (no client library: a few numbers)."""

from __future__ import annotations

import threading
from collections import Counter

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


class Histogram:
    def __init__(self, buckets: tuple[float, ...]):
        self.buckets, self.counts, self.total, self.n = buckets, [0] * len(buckets), 0.0, 0

    def observe(self, value: float) -> None:
        self.n += 1
        self.total += value
        for i, edge in enumerate(self.buckets):
            if value <= edge:
                self.counts[i] += 1

    def lines(self, name: str, labels: str = "") -> list[str]:
        sep = "," if labels else ""
        pairs = zip(self.buckets, self.counts, strict=True)
        out = [f'{name}_bucket{{{labels}{sep}le="{edge:g}"}} {c}' for edge, c in pairs]
        out += [f'{name}_bucket{{{labels}{sep}le="+Inf"}} {self.n}', f"{name}_sum{{{labels}}} {self.total:.6f}"]
        return [*out, f"{name}_count{{{labels}}} {self.n}"]


class Metrics:
    def __init__(self):
        self._lock = threading.Lock()
        self.queries: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.latency: dict[str, Histogram] = {}
        self.batches = Histogram(BATCH_BUCKETS)

    def query(self, kind: str, seconds: float) -> None:
        with self._lock:
            self.queries[kind] += 1
            self.latency.setdefault(kind, Histogram(LATENCY_BUCKETS)).observe(seconds)

    def error(self, code: str) -> None:
        with self._lock:
            self.errors[code] += 1

    def batch(self, size: int) -> None:
        with self._lock:
            self.batches.observe(size)

    def text(self) -> str:
        with self._lock:
            lines = ["# TYPE featpipe_queries_total counter"]
            lines += [f'featpipe_queries_total{{kind="{k}"}} {v}' for k, v in sorted(self.queries.items())]
            lines.append("# TYPE featpipe_errors_total counter")
            lines += [f'featpipe_errors_total{{code="{k}"}} {v}' for k, v in sorted(self.errors.items())]
            lines.append("# TYPE featpipe_query_seconds histogram")
            for kind, h in sorted(self.latency.items()):
                lines += h.lines("featpipe_query_seconds", f'kind="{kind}"')
            lines.append("# TYPE featpipe_batch_size histogram")
            lines += self.batches.lines("featpipe_batch_size")
        return "\n".join(lines) + "\n"
