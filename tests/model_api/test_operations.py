"""What operators and the proxy rely on: X-Model-Version, /stats, the request log, batching."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests

from model_api.models.example import digits_split
from tests.model_api.conftest import Server, http
from tests.support.model_server import export_digits, start_model_api

MODEL = "all-MiniLM-L6-v2"


def stats(client: requests.Session, server: Server | str) -> dict[str, Any]:
    url = server.url if isinstance(server, Server) else server
    result: dict[str, Any] = client.get(f"{url}/stats").json()
    return result


def request_lines(log: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in log.splitlines() if line.startswith('{"time"')]


def test_every_response_carries_the_same_model_version(client: requests.Session, server: Server) -> None:
    responses = [
        client.get(f"{server.url}/v2/health/live"),
        client.get(f"{server.url}/v2/health/ready"),
        client.get(f"{server.url}/v2"),
        client.get(f"{server.url}/v2/models/digits"),
        client.get(f"{server.url}/v1/models"),
        client.get(f"{server.url}/stats"),
        client.get(f"{server.url}/no/such/route"),
        client.post(f"{server.url}/v1/embeddings", json={"input": []}),
        client.post(f"{server.url}/v1/embeddings", json={"input": "versioned"}),
    ]
    versions = {response.headers.get("X-Model-Version") for response in responses}
    assert len(versions) == 1
    version = versions.pop()
    assert version is not None and re.fullmatch(r"[0-9a-f]{16}", version)
    assert stats(client, server)["version"] == version


def test_stats_count_requests_rows_and_forward_passes(client: requests.Session, server: Server) -> None:
    before = stats(client, server)["models"][MODEL]
    client.post(f"{server.url}/v1/embeddings", json={"input": ["one", "two", "three"]}).raise_for_status()
    client.post(f"{server.url}/v1/embeddings", json={"input": "four"}).raise_for_status()
    after = stats(client, server)["models"][MODEL]
    assert after["requests"] - before["requests"] == 2
    assert after["rows"] - before["rows"] == 4
    assert after["batches"] - before["batches"] == 2
    assert after["model_seconds"] > before["model_seconds"]


def test_refused_requests_compute_nothing(client: requests.Session, server: Server) -> None:
    before = stats(client, server)["models"][MODEL]
    client.post(f"{server.url}/v1/embeddings", json={"input": ["fine", ""]})
    assert stats(client, server)["models"][MODEL] == before


def test_one_log_line_per_request_with_pseudonym_and_no_address(
    client: requests.Session, server: Server
) -> None:
    marker = f"/v2/models/{MODEL}/ready"
    client.get(f"{server.url}{marker}", headers={"X-Client-Pseudonym": "client-7f3a"})
    client.post(
        f"{server.url}/v1/embeddings",
        json={"input": ["logged", "twice"]},
        headers={"X-Client-Pseudonym": "client-7f3a"},
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        lines = [line for line in request_lines(server.log()) if line.get("client") == "client-7f3a"]
        if len(lines) >= 2:
            break
        time.sleep(0.05)
    ready, embedding = lines[-2:]
    assert ready["method"] == "GET" and ready["path"] == marker and ready["status"] == 200
    assert embedding["path"] == "/v1/embeddings" and embedding["model"] == MODEL and embedding["rows"] == 2
    assert embedding["status"] == 200 and embedding["duration_ms"] > 0
    # The client's address appears nowhere in the log, and uvicorn's access log (which prints it) is off.
    assert "127.0.0.1:" not in server.log().split("(Press CTRL+C to quit)", 1)[-1]


def test_errors_are_logged_with_their_code(client: requests.Session, server: Server) -> None:
    client.post(
        f"{server.url}/v1/embeddings", json={"input": []}, headers={"X-Client-Pseudonym": "err-client"}
    )
    deadline = time.monotonic() + 10
    lines: list[dict[str, Any]] = []
    while time.monotonic() < deadline and not lines:
        lines = [line for line in request_lines(server.log()) if line.get("client") == "err-client"]
        time.sleep(0.05)
    assert lines[-1]["status"] == 400 and lines[-1]["error"] == "empty_input"


def test_concurrent_requests_are_batched_and_equal_unbatched_results(
    client: requests.Session, server: Server
) -> None:
    texts = [
        f"Sentence number {index} about {topic}." for index, topic in enumerate(["cats", "tax", "rain"] * 6)
    ]
    alone = [
        np.asarray(
            client.post(f"{server.url}/v1/embeddings", json={"input": text}).json()["data"][0]["embedding"]
        )
        for text in texts
    ]
    before = stats(client, server)["models"][MODEL]

    def embed(text: str) -> np.ndarray:
        session = http()
        try:
            response = session.post(f"{server.url}/v1/embeddings", json={"input": text}, timeout=60)
            return np.asarray(response.json()["data"][0]["embedding"])
        finally:
            session.close()

    with ThreadPoolExecutor(max_workers=len(texts)) as pool:
        together = list(pool.map(embed, texts))
    after = stats(client, server)["models"][MODEL]
    requests_made = after["requests"] - before["requests"]
    passes = after["batches"] - before["batches"]
    assert requests_made == len(texts)
    assert passes < requests_made, "concurrent requests should share forward passes"
    assert after["largest_batch"] > 1
    assert np.allclose(np.stack(together), np.stack(alone), atol=1e-5)


@pytest.fixture(scope="module")
def unbatched(work: Path, digits_program: Path) -> Iterator[str]:
    """Batching off, serving the digits program and its TorchScript twin (same seed, same weights)."""
    torchscript = export_digits(work / "digits-seed0.pt", seed=0)
    process, url = start_model_api(
        work, "--no-batching", "--model", f"digits={digits_program}", "--model", f"digits_ts={torchscript}"
    )
    try:
        yield url
    finally:
        process.stop()


@pytest.mark.slow
def test_without_batching_every_request_is_its_own_pass_and_answers_agree(
    client: requests.Session, server: Server, unbatched: str
) -> None:
    rows = digits_split().test_pixels[:24]

    def logits(url: str, model: str, row: np.ndarray) -> np.ndarray:
        session = http()
        try:
            body = {
                "inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1, 64], "data": row.tolist()}]
            }
            response = session.post(f"{url}/v2/models/{model}/infer", json=body, timeout=60)
            output = next(o for o in response.json()["outputs"] if o["name"] == "logits")
            return np.asarray(output["data"])
        finally:
            session.close()

    before = stats(client, unbatched)["models"]["digits"]
    with ThreadPoolExecutor(max_workers=12) as pool:
        one_by_one = list(pool.map(lambda row: logits(unbatched, "digits", row), rows))
        batched = list(pool.map(lambda row: logits(server.url, "digits", row), rows))
        torchscript = list(pool.map(lambda row: logits(unbatched, "digits_ts", row), rows))
    after = stats(client, unbatched)["models"]["digits"]
    assert after["requests"] - before["requests"] == len(rows)
    assert after["batches"] - before["batches"] == len(rows)
    assert after["largest_batch"] == 1
    assert np.allclose(np.stack(one_by_one), np.stack(batched), atol=1e-5)
    assert np.allclose(np.stack(torchscript), np.stack(batched), atol=1e-5)
    metadata = client.get(f"{unbatched}/v2/models/digits_ts").json()
    assert metadata["platform"] == "pytorch_libtorch"
    assert metadata["inputs"] == [{"name": "pixels", "datatype": "FP32", "shape": [-1, 64]}]
