"""What each model computed since the server started, as `GET /stats` reports it.

Counters are changed only on the event loop's thread (request handlers and the batcher's completion
callback), so they need no lock.

>>> stats = ModelStats()
>>> stats.record_request()
>>> stats.record_batch(rows=3, seconds=0.5)
>>> stats.as_dict()
{'requests': 1, 'rows': 3, 'batches': 1, 'model_seconds': 0.5, 'largest_batch': 3, 'mean_batch_rows': 3.0}
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ModelStats:
    requests: int = 0  # inference requests that reached the model (valid ones)
    rows: int = 0  # rows computed: texts embedded or tensor rows run
    batches: int = 0  # forward passes
    model_seconds: float = 0.0  # time spent inside forward passes (including tokenisation)
    largest_batch: int = 0

    def record_request(self) -> None:
        self.requests += 1

    def record_batch(self, rows: int, seconds: float) -> None:
        self.rows += rows
        self.batches += 1
        self.model_seconds += seconds
        self.largest_batch = max(self.largest_batch, rows)

    def as_dict(self) -> dict[str, int | float]:
        return {
            "requests": self.requests,
            "rows": self.rows,
            "batches": self.batches,
            "model_seconds": round(self.model_seconds, 6),
            "largest_batch": self.largest_batch,
            "mean_batch_rows": round(self.rows / self.batches, 3) if self.batches else 0.0,
        }
