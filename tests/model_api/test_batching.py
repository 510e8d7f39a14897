"""The dynamic batcher alone: pure asyncio with a plain function as the model."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from model_api.batching import BatcherClosed, DynamicBatcher, Overloaded


class Recorder:
    """A model that squares its rows and remembers every pass it was given."""

    def __init__(self, block: threading.Event | None = None, fail_on: int | None = None) -> None:
        self.passes: list[list[int]] = []
        self.block = block
        self.fail_on = fail_on

    def __call__(self, rows: list[int]) -> list[int]:
        if self.block is not None:
            self.block.wait(timeout=10)
        self.passes.append(list(rows))
        if self.fail_on is not None and self.fail_on in rows:
            raise RuntimeError("the model broke")
        return [row * row for row in rows]


@pytest.fixture
def executor() -> Iterator[ThreadPoolExecutor]:
    pool = ThreadPoolExecutor(max_workers=1)
    try:
        yield pool
    finally:
        pool.shutdown(wait=True)


def make(model: Recorder, executor: ThreadPoolExecutor, **options: object) -> DynamicBatcher[int, int]:
    settings: dict[str, object] = {"max_batch_size": 8, "max_delay_s": 0.05, **options}
    return DynamicBatcher(model, executor=executor, **settings)  # type: ignore[arg-type]


def test_concurrent_requests_share_one_pass_and_each_gets_its_own_rows(executor: ThreadPoolExecutor) -> None:
    model = Recorder()

    async def scenario() -> list[list[int]]:
        batcher = make(model, executor)
        answers = await asyncio.gather(batcher.submit([1, 2]), batcher.submit([3]), batcher.submit([4, 5, 6]))
        await batcher.close()
        return answers

    assert asyncio.run(scenario()) == [[1, 4], [9], [16, 25, 36]]
    assert model.passes == [[1, 2, 3, 4, 5, 6]]


def test_a_pass_never_exceeds_the_batch_size_and_large_requests_span_passes(
    executor: ThreadPoolExecutor,
) -> None:
    model = Recorder()

    async def scenario() -> list[list[int]]:
        batcher = make(model, executor, max_batch_size=3)
        answers = await asyncio.gather(batcher.submit([1, 2, 3, 4, 5]), batcher.submit([6, 7]))
        await batcher.close()
        return answers

    assert asyncio.run(scenario()) == [[1, 4, 9, 16, 25], [36, 49]]
    assert model.passes == [[1, 2, 3], [4, 5, 6], [7]]


def test_without_combining_each_pass_holds_one_request(executor: ThreadPoolExecutor) -> None:
    model = Recorder()

    async def scenario() -> list[list[int]]:
        batcher = make(model, executor, combine=False, max_batch_size=2)
        answers = await asyncio.gather(batcher.submit([1, 2, 3]), batcher.submit([4]), batcher.submit([5]))
        await batcher.close()
        return answers

    assert asyncio.run(scenario()) == [[1, 4, 9], [16], [25]]
    assert model.passes == [[1, 2], [3], [4], [5]]


def test_a_full_batch_runs_without_waiting_for_the_delay(executor: ThreadPoolExecutor) -> None:
    model = Recorder()

    async def scenario() -> float:
        batcher = make(model, executor, max_batch_size=2, max_delay_s=30.0)
        started = time.perf_counter()
        await asyncio.gather(batcher.submit([1]), batcher.submit([2]))
        elapsed = time.perf_counter() - started
        await batcher.close()
        return elapsed

    assert asyncio.run(scenario()) < 5.0
    assert model.passes == [[1, 2]]


def test_a_lone_request_waits_for_the_delay_then_runs(executor: ThreadPoolExecutor) -> None:
    model = Recorder()

    async def scenario() -> float:
        batcher = make(model, executor, max_batch_size=4, max_delay_s=0.2)
        started = time.perf_counter()
        assert await batcher.submit([3]) == [9]
        elapsed = time.perf_counter() - started
        await batcher.close()
        return elapsed

    assert asyncio.run(scenario()) >= 0.19


def test_rows_arriving_while_a_pass_runs_form_the_next_batch(executor: ThreadPoolExecutor) -> None:
    gate = threading.Event()
    model = Recorder(block=gate)

    async def scenario() -> list[list[int]]:
        batcher = make(model, executor, max_delay_s=0.0)
        first = asyncio.ensure_future(batcher.submit([1]))
        await asyncio.sleep(0.05)  # the first pass has started and waits at the gate
        later = [asyncio.ensure_future(batcher.submit([value])) for value in (2, 3, 4)]
        await asyncio.sleep(0.05)
        gate.set()
        answers = await asyncio.gather(first, *later)
        await batcher.close()
        return answers

    assert asyncio.run(scenario()) == [[1], [4], [9], [16]]
    assert model.passes == [[1], [2, 3, 4]]


def test_a_failing_pass_fails_its_requests_only(executor: ThreadPoolExecutor) -> None:
    model = Recorder(fail_on=2)

    async def scenario() -> tuple[list[object], list[int]]:
        batcher = make(model, executor)
        failed = await asyncio.gather(batcher.submit([1]), batcher.submit([2]), return_exceptions=True)
        after = await batcher.submit([5])
        await batcher.close()
        return failed, after

    failed, after = asyncio.run(scenario())
    assert all(isinstance(answer, RuntimeError) for answer in failed)
    assert after == [25]


def test_a_cancelled_request_is_not_computed(executor: ThreadPoolExecutor) -> None:
    gate = threading.Event()
    model = Recorder(block=gate)

    async def scenario() -> list[int]:
        batcher = make(model, executor, max_batch_size=1, max_delay_s=0.0)
        running = asyncio.ensure_future(batcher.submit([1]))
        abandoned = asyncio.ensure_future(batcher.submit([2]))
        await asyncio.sleep(0.05)
        abandoned.cancel()
        gate.set()
        answer = await running
        assert await batcher.submit([3]) == [9]
        await batcher.close()
        return answer

    assert asyncio.run(scenario()) == [1]
    assert [2] not in model.passes


def test_too_much_queued_work_is_refused(executor: ThreadPoolExecutor) -> None:
    gate = threading.Event()
    model = Recorder(block=gate)

    async def scenario() -> None:
        batcher = make(model, executor, max_batch_size=1, max_delay_s=0.0, max_queued_rows=2)
        running = asyncio.ensure_future(batcher.submit([1]))
        await asyncio.sleep(0.05)  # the first row is in its pass, the queue is empty
        queued = asyncio.ensure_future(batcher.submit([2, 3]))
        await asyncio.sleep(0.01)
        with pytest.raises(Overloaded):
            await batcher.submit([4])
        gate.set()
        assert await running == [1]
        assert await queued == [4, 9]
        await batcher.close()

    asyncio.run(scenario())


def test_closing_fails_running_and_queued_requests(executor: ThreadPoolExecutor) -> None:
    gate = threading.Event()
    model = Recorder(block=gate)

    async def scenario() -> None:
        batcher = make(model, executor, max_batch_size=1, max_delay_s=0.0)
        running = asyncio.ensure_future(batcher.submit([1]))
        queued = asyncio.ensure_future(batcher.submit([2]))
        await asyncio.sleep(0.05)
        await batcher.close()
        gate.set()
        for request in (running, queued):
            with pytest.raises(BatcherClosed):
                await request
        with pytest.raises(BatcherClosed):
            await batcher.submit([3])

    asyncio.run(scenario())


@settings(max_examples=40, deadline=None)
@given(
    requests=st.lists(st.lists(st.integers(-1000, 1000), min_size=1, max_size=12), min_size=1, max_size=12),
    max_batch_size=st.integers(1, 9),
    combine=st.booleans(),
)
def test_every_caller_gets_exactly_its_rows_in_order(
    requests: list[list[int]], max_batch_size: int, combine: bool
) -> None:
    model = Recorder()
    with ThreadPoolExecutor(max_workers=1) as pool:

        async def scenario() -> list[list[int]]:
            batcher = make(model, pool, max_batch_size=max_batch_size, max_delay_s=0.001, combine=combine)
            answers = await asyncio.gather(*(batcher.submit(rows) for rows in requests))
            await batcher.close()
            return answers

        answers = asyncio.run(scenario())
    assert answers == [[row * row for row in rows] for rows in requests]
    assert all(1 <= len(batch) <= max_batch_size for batch in model.passes)
    assert sum(len(batch) for batch in model.passes) == sum(len(rows) for rows in requests)
