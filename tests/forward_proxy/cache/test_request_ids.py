"""KServe request ids through a real `forward-proxy run`: clients such as the kserve SDK send a fresh `id`
with every request; an answer that only echoes it is shared across ids, with each asker's own id."""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from tests.support.proxy import RunningProxy, start_proxy
from tests.support.upstream import Received, Reply, Upstream

pytestmark = pytest.mark.integration

INFER = "/v2/models/digits/infer"
PIXELS = {"name": "pixels", "datatype": "FP32", "shape": [1, 4], "data": [0.0, 0.5, 0.25, 1.0]}


def binary_header(request_id: str) -> bytes:
    """The JSON header of a binary KServe answer (one INT64 label, 8 raw bytes after it)."""
    output = {"name": "label", "datatype": "INT64", "shape": [1], "parameters": {"binary_data_size": 8}}
    answer = {"id": request_id, "model_name": "digits", "outputs": [output]}
    return json.dumps(answer, separators=(",", ":")).encode()


def echoing(received: Received) -> bytes:
    """A KServe answer that writes the request's id back at the top, as KServe servers do."""
    header_length = received.header("Inference-Header-Content-Length")
    document = json.loads(received.body[: int(header_length)] if header_length else received.body)
    if header_length is not None:
        return binary_header(document["id"]) + struct.pack("<q", received.call)
    output = {"name": "label", "datatype": "INT64", "shape": [1], "data": [received.call]}
    return json.dumps({"id": document["id"], "model_name": "digits", "outputs": [output]}).encode()


def naming_the_id(received: Received) -> bytes:
    """An answer that uses the id beyond echoing it: never shared across ids."""
    document = json.loads(received.body)
    return json.dumps(
        {"id": document["id"], "outputs": [], "note": f"computed for {document['id']}"}
    ).encode()


@pytest.fixture
def upstream() -> Iterator[Upstream]:
    with Upstream() as server:
        server.reply(INFER, Reply(body=echoing))
        yield server


@pytest.fixture
def proxy(tmp_path: Path) -> Iterator[RunningProxy]:
    with start_proxy(tmp_path) as running:
        yield running


def infer(proxy: RunningProxy, upstream: Upstream, request_id: str) -> requests.Response:
    with proxy.session() as session:
        return session.post(upstream.url(INFER), json={"id": request_id, "inputs": [PIXELS]}, timeout=30)


def test_an_answer_that_echoes_the_id_is_a_hit_for_another_id_with_that_id(
    proxy: RunningProxy, upstream: Upstream
) -> None:
    first = infer(proxy, upstream, "3f0c-first")
    second = infer(proxy, upstream, "77aa-second")
    third = infer(proxy, upstream, "3f0c-first")
    assert [answer.headers["X-Cache"] for answer in (first, second, third)] == ["MISS", "HIT", "HIT"]
    assert upstream.calls(INFER) == 1
    assert second.json()["id"] == "77aa-second" and third.json()["id"] == "3f0c-first"
    assert second.json()["outputs"] == first.json()["outputs"] == third.json()["outputs"]
    assert "x-cache-echoes-id" not in {name.lower() for name in second.headers}


def test_an_answer_that_uses_the_id_otherwise_is_keyed_with_it(
    proxy: RunningProxy, upstream: Upstream
) -> None:
    upstream.reply(INFER, Reply(body=naming_the_id))
    first, second, again = (
        infer(proxy, upstream, name) for name in ("request-0001", "request-0002", "request-0001")
    )
    assert [answer.headers["X-Cache"] for answer in (first, second, again)] == ["MISS", "MISS", "HIT"]
    assert second.json()["note"] == "computed for request-0002" and again.json() == first.json()


def test_a_binary_answer_gets_the_askers_id_and_its_header_length(
    proxy: RunningProxy, upstream: Upstream
) -> None:
    def ask(request_id: str) -> requests.Response:
        header = json.dumps(
            {
                "id": request_id,
                "inputs": [
                    {
                        **{k: v for k, v in PIXELS.items() if k != "data"},
                        "parameters": {"binary_data_size": 16},
                    }
                ],
                "outputs": [{"name": "label", "parameters": {"binary_data": True}}],
            }
        ).encode()
        body = header + struct.pack("<4f", *PIXELS["data"])  # type: ignore[misc]
        headers = {
            "Content-Type": "application/octet-stream",
            "Inference-Header-Content-Length": str(len(header)),
        }
        with proxy.session() as session:
            return session.post(upstream.url(INFER), data=body, headers=headers, timeout=30)

    upstream.reply(  # the first answer's JSON header length: only the first request is computed
        INFER,
        Reply(
            body=echoing,
            content_type="application/octet-stream",
            headers={"Inference-Header-Content-Length": str(len(binary_header("a")))},
        ),
    )
    first, second = ask("a"), ask("a-much-longer-request-id")
    assert [first.headers["X-Cache"], second.headers["X-Cache"]] == ["MISS", "HIT"] and upstream.calls(
        INFER
    ) == 1
    for answer, request_id in ((first, "a"), (second, "a-much-longer-request-id")):
        length = int(answer.headers["Inference-Header-Content-Length"])
        assert json.loads(answer.content[:length])["id"] == request_id
        assert struct.unpack("<q", answer.content[length:]) == (1,)  # the one computation's tensor
