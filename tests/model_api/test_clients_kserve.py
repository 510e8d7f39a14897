"""The kserve SDK's REST client (`kserve.InferenceRESTClient`, httpx underneath) against the real server,
directly and through the forward proxy named by `HTTP_PROXY`, with JSON and binary tensors."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest
import requests
from kserve import InferenceRESTClient, InferInput, InferRequest, RESTConfig
from kserve.protocol.infer_type import RequestedOutput

from model_api.models.example import digits_split
from tests.model_api.conftest import Server
from tests.support.proxy import RunningProxy, start_proxy

MODEL = "all-MiniLM-L6-v2"
PROXY_VARIABLES = ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")


def digits_request(rows: np.ndarray, binary: bool) -> InferRequest:
    pixels = InferInput("pixels", list(rows.shape), "FP32")
    pixels.set_data_from_numpy(rows.astype(np.float32), binary_data=binary)
    outputs = [RequestedOutput(name, parameters={"binary_data": binary}) for name in ("logits", "label")]
    return InferRequest("digits", [pixels], request_id="k-1", request_outputs=outputs)


def text_request(texts: list[str], binary: bool) -> InferRequest:
    text = InferInput("text", [len(texts)], "BYTES")
    text.set_data_from_numpy(np.array(texts, dtype=object), binary_data=binary)
    output = RequestedOutput("embedding", parameters={"binary_data": binary})
    return InferRequest(MODEL, [text], request_outputs=[output])


def outputs_of(response: Any) -> dict[str, np.ndarray]:
    return {output.name: output.as_numpy() for output in response.outputs}


def run(base_url: str, work: Any) -> Any:
    """Run `work(client)` with a fresh client (httpx reads the proxy variables when it is made)."""

    async def go() -> Any:
        async with InferenceRESTClient(RESTConfig(protocol="v2", retries=0, timeout=120)) as client:
            return await work(client, base_url)

    return asyncio.run(go())


def reference(client: requests.Session, server: Server, rows: np.ndarray) -> dict[str, np.ndarray]:
    tensor = {
        "name": "pixels",
        "datatype": "FP32",
        "shape": list(rows.shape),
        "data": rows.reshape(-1).tolist(),
    }
    answer = client.post(f"{server.url}/v2/models/digits/infer", json={"inputs": [tensor]}, timeout=60).json()
    return {
        output["name"]: np.asarray(output["data"]).reshape(output["shape"]) for output in answer["outputs"]
    }


@pytest.fixture
def no_proxy_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (*PROXY_VARIABLES, "NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)


async def health(client: InferenceRESTClient, base_url: str) -> tuple[bool, bool, bool, bool]:
    return (
        await client.is_server_live(base_url),
        await client.is_server_ready(base_url),
        await client.is_model_ready(base_url, "digits"),
        await client.is_model_ready(base_url, "nope"),
    )


def test_digits_and_embeddings_in_binary_and_json(
    server: Server, client: requests.Session, no_proxy_variables: None
) -> None:
    rows = digits_split().test_pixels[:16]
    texts = ["first text", "a second, longer text"]

    async def infer(rest: InferenceRESTClient, base_url: str) -> list[tuple[Any, Any]]:
        return [
            (
                await rest.infer(base_url, digits_request(rows, binary), model_name="digits"),
                await rest.infer(base_url, text_request(texts, binary), model_name=MODEL),
            )
            for binary in (True, False)
        ]

    expected = reference(client, server, rows)
    openai = client.post(f"{server.url}/v1/embeddings", json={"input": texts, "model": MODEL}).json()
    vectors = np.asarray([item["embedding"] for item in openai["data"]], dtype=np.float32)
    for digits, embeddings in run(server.url, infer):
        assert digits.id == "k-1"
        assert np.array_equal(outputs_of(digits)["label"], expected["label"])
        assert np.allclose(outputs_of(digits)["logits"], expected["logits"], atol=1e-6)
        assert np.allclose(outputs_of(embeddings)["embedding"], vectors, atol=1e-6)


def test_health_and_an_error_with_the_servers_message(server: Server, no_proxy_variables: None) -> None:
    assert run(server.url, health) == (True, True, True, False)

    async def unknown(rest: InferenceRESTClient, base_url: str) -> None:
        await rest.infer(base_url, digits_request(np.zeros((1, 64)), True), model_name="nope")

    with pytest.raises(httpx.HTTPStatusError) as raised:
        run(server.url, unknown)
    assert raised.value.response.status_code == 404
    assert str(raised.value).startswith("No model named 'nope'. Loaded: all-MiniLM-L6-v2, digits.")


@pytest.fixture(scope="module")
def forward_proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningProxy]:
    proxy = start_proxy(tmp_path_factory.mktemp("forward-proxy"), "--access-log", "-")
    try:
        yield proxy
    finally:
        proxy.stop()


def test_through_http_proxy(
    server: Server,
    client: requests.Session,
    forward_proxy: RunningProxy,
    no_proxy_variables: None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name, value in forward_proxy.env.items():
        monkeypatch.setenv(name, value)
    rows = digits_split().test_pixels[:4]

    async def infer(rest: InferenceRESTClient, base_url: str) -> list[tuple[Any, dict[str, str]]]:
        answers = []
        for binary in (True, True, False):
            headers: dict[str, str] = {}
            answer = await rest.infer(
                base_url, digits_request(rows, binary), model_name="digits", response_headers=headers
            )
            answers.append((answer, headers))
        return answers

    answers = run(server.url, infer)
    expected = reference(client, server, rows)
    for answer, headers in answers:
        assert np.array_equal(outputs_of(answer)["label"], expected["label"])
        assert "x-cache" in {name.lower() for name in headers}  # answered through the proxy
    lines = [json.loads(line) for line in forward_proxy.log().splitlines() if line.startswith("{")]
    assert [line["status"] for line in lines if line["path"] == "/v2/models/digits/infer"] == [200, 200, 200]


def test_the_sdks_fresh_ids_still_hit_through_the_proxy(
    server: Server,
    forward_proxy: RunningProxy,
    no_proxy_variables: None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The kserve SDK sends a new UUID as `id` with every request it is not given one for; the model API
    only echoes it, so the proxy answers the repeat from the cache, with the repeat's own id."""
    for name, value in forward_proxy.env.items():
        monkeypatch.setenv(name, value)
    rows = digits_split().test_pixels[4:6]

    async def infer(rest: InferenceRESTClient, base_url: str) -> list[tuple[Any, dict[str, str]]]:
        answers = []
        for _ in range(2):
            request = digits_request(rows, binary=True)
            request.id = None  # the SDK's default: a fresh UUID on the wire
            headers: dict[str, str] = {}
            answer = await rest.infer(base_url, request, model_name="digits", response_headers=headers)
            answers.append((answer, {name.lower(): value for name, value in headers.items()}))
        return answers

    (first, first_headers), (second, second_headers) = run(server.url, infer)
    assert (first_headers["x-cache"], second_headers["x-cache"]) == ("MISS", "HIT")
    assert first.id != second.id and len(first.id) == len(second.id) == 36  # each its own UUID
    assert np.array_equal(outputs_of(first)["label"], outputs_of(second)["label"])
    assert np.array_equal(outputs_of(first)["logits"], outputs_of(second)["logits"])
