"""The application's wiring, in process, with small fake models (no weights to load)."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections.abc import Iterator
from typing import Any, Literal

import numpy as np
import pytest
from fastapi.testclient import TestClient

from model_api.app import create_app
from model_api.errors import ApiError
from model_api.models.base import EmbeddingRow
from model_api.models.registry import Registry, ServedModel
from model_api.settings import Settings
from model_api.tensors import TensorSpec


class LengthEmbedder:
    """Embeds a text as [len, len, len, len]; the text 'boom' breaks it."""

    name = "lengths"
    kind: Literal["embedding"] = "embedding"
    platform = "fake"
    inputs = (TensorSpec("text", "BYTES", (-1,)),)
    outputs = (TensorSpec("embedding", "FP32", (-1, 4)),)
    batchable = True
    digest = "a" * 64
    dimension = 4
    max_tokens = 8
    vocab_size = 100

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.gate.set()

    def run_batch(self, rows: list[Any]) -> list[EmbeddingRow]:
        self.gate.wait(timeout=10)
        if "boom" in rows:
            raise RuntimeError("the fake model broke")
        return [EmbeddingRow(np.full(4, len(row), dtype=np.float32), len(row)) for row in rows]


class Tracer:
    """A tensor model without a batch dimension: the trace of one 2x2 matrix."""

    name = "trace"
    kind: Literal["tensor"] = "tensor"
    platform = "fake"
    inputs = (TensorSpec("matrix", "FP32", (2, 2)),)
    outputs = (TensorSpec("trace", "FP32", ()),)
    batchable = False
    digest = "b" * 64

    def run_batch(self, rows: list[Any]) -> list[dict[str, np.ndarray]]:
        return [{"trace": np.asarray(np.trace(row["matrix"]), dtype=np.float32)} for row in rows]


def make_registry(settings: Settings, embedder: LengthEmbedder | None = None) -> Registry:
    return Registry([ServedModel(embedder or LengthEmbedder(), settings), ServedModel(Tracer(), settings)])


@pytest.fixture
def client() -> Iterator[TestClient]:
    settings = Settings()
    with TestClient(create_app(settings, make_registry(settings))) as test_client:
        yield test_client


def test_a_failing_model_gives_a_500_in_the_error_shape_and_the_server_goes_on(client: TestClient) -> None:
    failed = client.post("/v1/embeddings", json={"input": ["fine", "boom"]})
    assert failed.status_code == 500
    assert failed.json()["error"]["code"] == "internal_error"
    assert "the fake model broke" in failed.json()["error"]["message"]
    assert failed.headers["X-Model-Version"] == client.get("/v2/health/live").headers["X-Model-Version"]
    assert client.post("/v1/embeddings", json={"input": "fine"}).json()["data"][0]["embedding"] == [4.0] * 4


def test_a_model_without_batch_dimension_runs_whole_requests(client: TestClient) -> None:
    metadata = client.get("/v2/models/trace").json()
    assert metadata["max_batch_size"] == 0
    assert metadata["inputs"] == [{"name": "matrix", "datatype": "FP32", "shape": [2, 2]}]
    body = {"inputs": [{"name": "matrix", "datatype": "FP32", "shape": [2, 2], "data": [1, 2, 3, 4]}]}
    answer = client.post("/v2/models/trace/infer", json=body).json()
    assert answer["outputs"] == [{"name": "trace", "datatype": "FP32", "shape": [], "data": [5.0]}]
    wrong = dict(
        body, inputs=[{"name": "matrix", "datatype": "FP32", "shape": [1, 2, 2], "data": [1, 2, 3, 4]}]
    )
    assert "expected [2, 2]" in client.post("/v2/models/trace/infer", json=wrong).json()["error"]
    assert client.get("/stats").json()["models"]["trace"]["rows"] == 1


def test_the_deployment_version_depends_on_every_model() -> None:
    settings = Settings()
    both = make_registry(settings)
    alone = Registry([ServedModel(LengthEmbedder(), settings)])
    assert both.version != alone.version
    assert both.version == make_registry(settings).version


def test_the_request_line_names_model_rows_and_pseudonym(
    client: TestClient, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="model_api.requests"):
        client.post(
            "/v1/embeddings", json={"input": ["a", "bb"]}, headers={"X-Client-Pseudonym": "c-1 <script>"}
        )
    line = json.loads(caplog.records[-1].getMessage())
    assert line["event"] == "request" and line["path"] == "/v1/embeddings" and line["status"] == 200
    assert line["model"] == "lengths" and line["rows"] == 2
    assert line["client"] == "c-1__script_"
    assert "testclient" not in caplog.records[-1].getMessage()  # TestClient's client address


def test_too_much_queued_work_is_refused_with_503() -> None:
    settings = Settings(max_queued_rows=2, max_batch_size=1, max_batch_delay_ms=0)
    embedder = LengthEmbedder()
    served = ServedModel(embedder, settings)

    async def scenario() -> ApiError:
        embedder.gate.clear()
        running = asyncio.ensure_future(served.infer(["a"]))
        await asyncio.sleep(0.05)
        queued = asyncio.ensure_future(served.infer(["b", "c"]))
        await asyncio.sleep(0.01)
        with pytest.raises(ApiError) as refused:
            await served.infer(["d"])
        embedder.gate.set()
        await asyncio.gather(running, queued)
        await served.close()
        return refused.value

    refusal = asyncio.run(scenario())
    assert (refusal.status_code, refusal.code) == (503, "overloaded")


def test_a_request_queued_at_shutdown_gets_503() -> None:
    settings = Settings(max_batch_size=1, max_batch_delay_ms=0)
    embedder = LengthEmbedder()
    served = ServedModel(embedder, settings)

    async def scenario() -> list[BaseException | Any]:
        embedder.gate.clear()
        requests = [asyncio.ensure_future(served.infer([text])) for text in ("a", "b")]
        await asyncio.sleep(0.05)
        closing = asyncio.ensure_future(served.close())
        await asyncio.sleep(0.05)
        embedder.gate.set()
        await closing
        return await asyncio.gather(*requests, return_exceptions=True)

    for answer in asyncio.run(scenario()):
        assert isinstance(answer, ApiError) and (answer.status_code, answer.code) == (503, "shutting_down")
