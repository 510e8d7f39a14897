"""Dynamic batching, as Triton's dynamic batcher does it: concurrent requests share forward passes.

A request brings one or more rows. The batcher queues them and, once the oldest queued row has waited
`max_delay_s` or `max_batch_size` rows are waiting, hands up to `max_batch_size` rows to `run_batch` in
one call on a worker thread, so the event loop keeps accepting requests meanwhile. While a pass runs the
next batch gathers, so under load batches fill up without any added delay. Each caller gets exactly its
own rows back, in order; a request larger than `max_batch_size` is spread over several passes.

With `combine=False` requests are never mixed: each pass holds rows of one request only (the baseline
that benchmarks compare against).

Thread-safety: `submit` and the worker coroutine run on one event loop; only `run_batch` runs on the
executor's thread. `run_batch` must therefore be safe to call from that thread, one call at a time
(give the batcher an executor with one worker per model).

>>> import asyncio
>>> from concurrent.futures import ThreadPoolExecutor
>>> passes = []
>>> def double(rows):
...     passes.append(len(rows))
...     return [2 * row for row in rows]
>>> async def main():
...     batcher = DynamicBatcher(double, max_batch_size=8, max_delay_s=0.05,
...                              executor=ThreadPoolExecutor(max_workers=1))
...     answers = await asyncio.gather(batcher.submit([1, 2]), batcher.submit([3]))
...     await batcher.close()
...     return answers
>>> asyncio.run(main()), passes
([[2, 4], [6]], [3])
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

Row = TypeVar("Row")
Result = TypeVar("Result")


class Overloaded(Exception):
    """More rows are queued than the batcher accepts; the caller should retry later."""


class BatcherClosed(Exception):
    """The batcher was closed (the server is shutting down) before this request ran."""


@dataclass(eq=False)
class _Pending(Generic[Row, Result]):
    rows: Sequence[Row]
    future: asyncio.Future[list[Result]]
    arrival: float
    results: list[Any] = field(default_factory=list)
    next_row: int = 0  # the first row not yet handed to a forward pass

    @property
    def waiting_rows(self) -> int:
        return len(self.rows) - self.next_row


@dataclass(frozen=True)
class _Slice(Generic[Row, Result]):
    pending: _Pending[Row, Result]
    start: int
    stop: int


BatchObserver = Callable[[int, float], None]


class DynamicBatcher(Generic[Row, Result]):
    """Gathers the rows of concurrent `submit` calls into calls of `run_batch`.

    `run_batch(rows)` must return one result per row, in order. `on_batch(rows, seconds)` is told about
    every pass that completed (on the event loop thread), for statistics.
    """

    def __init__(
        self,
        run_batch: Callable[[list[Row]], list[Result]],
        *,
        max_batch_size: int,
        max_delay_s: float,
        executor: Executor,
        combine: bool = True,
        max_queued_rows: int | None = None,
        on_batch: BatchObserver | None = None,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be at least 1")
        if max_delay_s < 0:
            raise ValueError("max_delay_s must not be negative")
        self.max_batch_size = max_batch_size
        self.max_delay_s = max_delay_s
        self.combine = combine
        self.max_queued_rows = max_queued_rows
        self._run_batch = run_batch
        self._executor = executor
        self._on_batch = on_batch
        self._queue: collections.deque[_Pending[Row, Result]] = collections.deque()
        self._queued_rows = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wakeup: asyncio.Event | None = None
        self._worker: asyncio.Task[None] | None = None
        self._closed = False

    @property
    def queued_rows(self) -> int:
        """Rows submitted and not yet handed to a forward pass."""
        return self._queued_rows

    async def submit(self, rows: Sequence[Row]) -> list[Result]:
        """Queue `rows` and return their results once every one of them went through a forward pass."""
        if self._closed:
            raise BatcherClosed("the batcher is closed")
        if not rows:
            return []
        limit = self.max_queued_rows
        # A request larger than the whole queue is still served when it is alone, or it never could be.
        if limit is not None and self._queued_rows and self._queued_rows + len(rows) > limit:
            raise Overloaded(f"{self._queued_rows} rows are already waiting (limit {limit})")
        loop = asyncio.get_running_loop()
        wakeup = self._start(loop)
        pending: _Pending[Row, Result] = _Pending(
            rows=rows, future=loop.create_future(), arrival=loop.time(), results=[None] * len(rows)
        )
        self._queue.append(pending)
        self._queued_rows += len(rows)
        wakeup.set()
        # A cancelled caller cancels `future`; the worker then skips the rows it has not started.
        return await pending.future

    async def close(self) -> None:
        """Stop the worker; requests still queued fail with `BatcherClosed`."""
        self._closed = True
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
        while self._queue:
            pending = self._queue.popleft()
            if not pending.future.done():
                pending.future.set_exception(BatcherClosed("the server is shutting down"))
        self._queued_rows = 0

    def _start(self, loop: asyncio.AbstractEventLoop) -> asyncio.Event:
        if self._loop is not loop or self._wakeup is None or self._worker is None or self._worker.done():
            self._loop = loop
            self._wakeup = asyncio.Event()
            self._worker = loop.create_task(self._work(self._wakeup), name="dynamic-batcher")
        return self._wakeup

    async def _work(self, wakeup: asyncio.Event) -> None:
        while True:
            while not self._queue:
                wakeup.clear()
                await wakeup.wait()
            if self.combine:
                await self._gather(wakeup)
            batch = self._take()
            if batch:
                await self._run(batch)

    async def _gather(self, wakeup: asyncio.Event) -> None:
        """Wait until a full batch is queued or the oldest request has waited `max_delay_s`."""
        loop = asyncio.get_running_loop()
        deadline = self._queue[0].arrival + self.max_delay_s
        while self._queued_rows < self.max_batch_size:
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            wakeup.clear()
            try:
                await asyncio.wait_for(wakeup.wait(), remaining)
            except TimeoutError:
                return

    def _take(self) -> list[_Slice[Row, Result]]:
        """Remove up to `max_batch_size` rows from the front of the queue (one request's if not combining)."""
        batch: list[_Slice[Row, Result]] = []
        room = self.max_batch_size
        while self._queue and room > 0:
            pending = self._queue[0]
            if pending.future.done():  # cancelled by its caller, or failed in an earlier pass
                self._queue.popleft()
                self._queued_rows -= pending.waiting_rows
                continue
            count = min(room, pending.waiting_rows)
            batch.append(_Slice(pending, pending.next_row, pending.next_row + count))
            pending.next_row += count
            self._queued_rows -= count
            room -= count
            if pending.waiting_rows == 0:
                self._queue.popleft()
            if not self.combine:
                break
        return batch

    async def _run(self, batch: list[_Slice[Row, Result]]) -> None:
        rows = [row for part in batch for row in part.pending.rows[part.start : part.stop]]
        loop = asyncio.get_running_loop()
        try:
            results, seconds = await loop.run_in_executor(self._executor, _timed, self._run_batch, rows)
            if len(results) != len(rows):
                raise RuntimeError(f"the model returned {len(results)} results for {len(rows)} rows")
        except asyncio.CancelledError:  # closed while the pass ran
            self._fail(batch, BatcherClosed("the server is shutting down"))
            raise
        except Exception as error:  # the model failed: every request in this pass fails with it
            self._fail(batch, error)
            return
        if self._on_batch is not None:
            self._on_batch(len(rows), seconds)
        offset = 0
        for part in batch:
            pending = part.pending
            size = part.stop - part.start
            pending.results[part.start : part.stop] = results[offset : offset + size]
            offset += size
            finished = part.stop == len(pending.rows)
            if finished and not pending.future.done():
                pending.future.set_result(pending.results)

    @staticmethod
    def _fail(batch: list[_Slice[Row, Result]], error: BaseException) -> None:
        for part in batch:
            if not part.pending.future.done():
                part.pending.future.set_exception(error)


def _timed(run: Callable[[list[Row]], list[Result]], rows: list[Row]) -> tuple[list[Result], float]:
    started = time.perf_counter()
    results = run(rows)
    return results, time.perf_counter() - started
