"""Every kind of bad input gets a 4xx in its protocol's error shape, naming the problem, and the server
stays up. Under /v2 the shape is KServe's `{"error": "<message>"}` (the code is in the request log only).

One table, one row per refusal: what is sent, which status and code come back, and (where it matters)
which parameter or expected value the error names.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import requests

from tests.model_api.conftest import LIMITS, Server

MODEL = "all-MiniLM-L6-v2"
EMBEDDINGS = "/v1/embeddings"
DIGITS = "/v2/models/digits/infer"
MINILM_INFER = f"/v2/models/{MODEL}/infer"
JSON = {"Content-Type": "application/json"}


def pixels(
    shape: list[int], data: Any = None, datatype: str = "FP32", name: str = "pixels"
) -> dict[str, Any]:
    count = 1
    for size in shape:
        count *= size
    return {
        "name": name,
        "datatype": datatype,
        "shape": shape,
        "data": [0.5] * count if data is None else data,
    }


@dataclass
class Case:
    id: str
    path: str
    status: int
    code: str
    json: Any = None
    raw: bytes | None = None
    method: str = "POST"
    headers: dict[str, str] = field(default_factory=dict)
    chunked: bool = False
    fields: dict[str, Any] = field(default_factory=dict)  # further fields the error must carry


CASES = [
    # The body itself
    Case("malformed JSON", EMBEDDINGS, 400, "invalid_json", raw=b'{"input": ', headers=JSON),
    Case("malformed JSON for a tensor", DIGITS, 400, "invalid_json", raw=b"[1, 2", headers=JSON),
    Case("no body", EMBEDDINGS, 422, "invalid_request", raw=b"", headers=JSON),
    Case(
        "not JSON at all",
        EMBEDDINGS,
        415,
        "unsupported_media_type",
        raw=b"input=hi",
        headers={"Content-Type": "text/plain"},
    ),
    Case(
        "body over the limit",
        EMBEDDINGS,
        413,
        "body_too_large",
        json={"input": ["a" * 1000] * 300},
        fields={"limit": LIMITS["max_body_bytes"]},
    ),
    Case(
        "streamed body over the limit",
        EMBEDDINGS,
        413,
        "body_too_large",
        raw=b"[" + b'"aaaaaaaa",' * 40_000 + b'"a"]',
        headers=JSON,
        chunked=True,
    ),
    # OpenAI embeddings
    Case(
        "missing input", EMBEDDINGS, 422, "invalid_request", json={"model": MODEL}, fields={"param": "input"}
    ),
    Case(
        "input of the wrong type",
        EMBEDDINGS,
        422,
        "invalid_request",
        json={"input": 3},
        fields={"param": "input"},
    ),
    Case("mixed input list", EMBEDDINGS, 422, "invalid_request", json={"input": ["a", 1]}),
    Case("empty input list", EMBEDDINGS, 400, "empty_input", json={"input": []}, fields={"param": "input"}),
    Case("empty text", EMBEDDINGS, 400, "empty_input", json={"input": ""}, fields={"param": "input"}),
    Case(
        "empty text in a list",
        EMBEDDINGS,
        400,
        "empty_input",
        json={"input": ["a", ""]},
        fields={"param": "input[1]"},
    ),
    Case(
        "too many inputs",
        EMBEDDINGS,
        413,
        "too_many_inputs",
        json={"input": ["a"] * (LIMITS["max_inputs"] + 1)},
        fields={"limit": LIMITS["max_inputs"]},
    ),
    Case(
        "text too long",
        EMBEDDINGS,
        413,
        "input_too_long",
        json={"input": ["ok", "a" * (LIMITS["max_text_chars"] + 1)]},
        fields={"param": "input[1]", "limit": LIMITS["max_text_chars"]},
    ),
    Case(
        "token ids (refused by default)",
        EMBEDDINGS,
        400,
        "token_ids_not_accepted",
        json={"input": [[101, 7592, 102], [101, 99_999_999, 102]]},
        fields={"param": "input[0]"},
    ),
    Case(
        "unknown encoding", EMBEDDINGS, 422, "invalid_request", json={"input": "a", "encoding_format": "hex"}
    ),
    Case(
        "too many dimensions",
        EMBEDDINGS,
        400,
        "invalid_dimensions",
        json={"input": "a", "dimensions": 385},
        fields={"expected": 384},
    ),
    Case(
        "unknown model",
        EMBEDDINGS,
        404,
        "model_not_found",
        json={"input": "a", "model": "gpt-9"},
        fields={"param": "model"},
    ),
    Case(
        "a tensor model for embeddings",
        EMBEDDINGS,
        400,
        "not_an_embedding_model",
        json={"input": "a", "model": "digits"},
    ),
    # KServe v2 tensors
    Case(
        "wrong shape",
        DIGITS,
        400,
        "wrong_shape",
        json={"inputs": [pixels([1, 63])]},
        fields={"expected": [-1, 64]},
    ),
    Case(
        "wrong rank",
        DIGITS,
        400,
        "wrong_shape",
        json={"inputs": [pixels([64])]},
        fields={"expected": [-1, 64]},
    ),
    Case(
        "shape and data disagree",
        DIGITS,
        400,
        "wrong_shape",
        json={"inputs": [pixels([2, 64], data=[0.5] * 64)]},
    ),
    Case(
        "wrong datatype",
        DIGITS,
        400,
        "wrong_datatype",
        json={"inputs": [pixels([1, 64], datatype="FP64")]},
        fields={"expected": "FP32"},
    ),
    Case(
        "strings in a number tensor",
        DIGITS,
        400,
        "invalid_tensor_data",
        json={"inputs": [pixels([1, 64], data=["x"] * 64)]},
    ),
    Case(
        "unknown input name", DIGITS, 400, "unknown_input", json={"inputs": [pixels([1, 64], name="image")]}
    ),
    Case(
        "input given twice",
        DIGITS,
        400,
        "duplicate_input",
        json={"inputs": [pixels([1, 64]), pixels([1, 64])]},
    ),
    Case("no inputs", DIGITS, 400, "empty_input", json={"inputs": []}),
    Case("missing inputs field", DIGITS, 400, "invalid_request", json={"id": "x"}),
    Case("no rows", DIGITS, 400, "empty_input", json={"inputs": [pixels([0, 64])]}),
    Case(
        "too many rows",
        DIGITS,
        413,
        "too_many_inputs",
        json={"inputs": [pixels([LIMITS["max_inputs"] + 1, 64])]},
        fields={"limit": LIMITS["max_inputs"]},
    ),
    Case(
        "unknown output",
        DIGITS,
        400,
        "unknown_output",
        json={"inputs": [pixels([1, 64])], "outputs": [{"name": "probabilities"}]},
    ),
    Case(
        "unknown model for inference",
        "/v2/models/nope/infer",
        404,
        "model_not_found",
        json={"inputs": [pixels([1, 64])]},
    ),
    Case(
        "unknown model version",
        "/v2/models/digits/versions/0000/infer",
        404,
        "version_not_found",
        json={"inputs": [pixels([1, 64])]},
    ),
    Case(
        "number where text belongs",
        MINILM_INFER,
        400,
        "invalid_tensor_data",
        json={"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": [5]}]},
    ),
    Case(
        "text too long for KServe",
        MINILM_INFER,
        413,
        "input_too_long",
        json={
            "inputs": [
                {
                    "name": "text",
                    "datatype": "BYTES",
                    "shape": [1],
                    "data": ["a" * (LIMITS["max_text_chars"] + 1)],
                }
            ]
        },
    ),
    # Routes
    Case("unknown model metadata", "/v2/models/nope", 404, "model_not_found", method="GET"),
    Case("unknown route", "/v3/anything", 404, "not_found", method="GET"),
    Case("wrong method", EMBEDDINGS, 405, "method_not_allowed", method="GET"),
]


def send(client: requests.Session, server: Server, case: Case) -> requests.Response:
    url = f"{server.url}{case.path}"
    if case.chunked:
        assert case.raw is not None
        body = case.raw
        pieces = (body[start : start + 65_536] for start in range(0, len(body), 65_536))
        return client.request(case.method, url, data=pieces, headers=case.headers, timeout=60)
    if case.json is not None:
        return client.request(case.method, url, json=case.json, headers=case.headers, timeout=60)
    return client.request(case.method, url, data=case.raw, headers=case.headers, timeout=60)


@pytest.fixture(scope="module")
def version(client: requests.Session, server: Server) -> Iterator[str]:
    value = client.get(f"{server.url}/v2/health/live").headers["X-Model-Version"]
    yield value
    # The campaign above left the server up and serving.
    after = client.post(f"{server.url}/v1/embeddings", json={"input": "still alive?"}, timeout=60)
    assert after.status_code == 200 and after.headers["X-Model-Version"] == value


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_bad_input_is_refused_in_the_one_error_shape(
    client: requests.Session, server: Server, version: str, case: Case
) -> None:
    response = send(client, server, case)
    assert response.status_code == case.status, response.text
    assert response.headers["Content-Type"].startswith("application/json")
    assert response.headers["X-Model-Version"] == version
    body = response.json()
    assert set(body) == {"error"}
    if case.path.startswith("/v2"):
        assert isinstance(body["error"], str) and len(body["error"]) > 10
        for value in case.fields.values():  # KServe's shape has no fields: the message names them
            assert str(value) in body["error"], body
        return
    error = body["error"]
    assert error["code"] == case.code
    assert isinstance(error["message"], str) and len(error["message"]) > 10
    for name, value in case.fields.items():
        assert error.get(name) == value, error


def test_messages_name_the_expected_shape_and_datatype(client: requests.Session, server: Server) -> None:
    shape = client.post(f"{server.url}{DIGITS}", json={"inputs": [pixels([1, 8, 8])]}).json()["error"]
    datatype = client.post(
        f"{server.url}{DIGITS}", json={"inputs": [pixels([1, 64], datatype="INT64", data=[1] * 64)]}
    )
    assert "[-1, 64]" in shape
    assert "expected FP32" in datatype.json()["error"]
