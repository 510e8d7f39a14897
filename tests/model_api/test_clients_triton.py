"""Triton's official HTTP client (`tritonclient.http`) against the real model server.

Its defaults are the binary tensor data extension (inputs and outputs as raw bytes); JSON is asked for
with `binary_data=False`. Every error must reach the caller as `InferenceServerException` with the
server's status and message. tritonclient cannot use an HTTP proxy: through the forward proxy it goes in
reverse mode, the proxy standing in for the server.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator

import numpy as np
import pytest
import requests
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from model_api.models.example import digits_split
from tests.model_api.conftest import LIMITS, Server
from tests.support.proxy import RunningProxy, start_proxy

MODEL = "all-MiniLM-L6-v2"


def client_for(url: str) -> triton.InferenceServerClient:
    return triton.InferenceServerClient(url.removeprefix("http://"), network_timeout=120.0)


@pytest.fixture(scope="module")
def triton_client(server: Server) -> Iterator[triton.InferenceServerClient]:
    client = client_for(server.url)
    try:
        yield client
    finally:
        client.close()


def pixels(rows: np.ndarray, binary: bool) -> triton.InferInput:
    tensor = triton.InferInput("pixels", list(rows.shape), "FP32")
    tensor.set_data_from_numpy(rows.astype(np.float32), binary_data=binary)
    return tensor


def texts(values: list[str], binary: bool) -> triton.InferInput:
    tensor = triton.InferInput("text", [len(values)], "BYTES")
    tensor.set_data_from_numpy(np.array(values, dtype=object), binary_data=binary)
    return tensor


def reference(client: requests.Session, server: Server, rows: np.ndarray) -> dict[str, np.ndarray]:
    """The digits model's answer through plain JSON, without tritonclient."""
    body = {
        "inputs": [
            {
                "name": "pixels",
                "datatype": "FP32",
                "shape": list(rows.shape),
                "data": rows.reshape(-1).tolist(),
            }
        ]
    }
    answer = client.post(f"{server.url}/v2/models/digits/infer", json=body, timeout=60).json()
    return {
        output["name"]: np.asarray(output["data"]).reshape(output["shape"]) for output in answer["outputs"]
    }


def test_health_and_metadata(triton_client: triton.InferenceServerClient) -> None:
    assert triton_client.is_server_live() and triton_client.is_server_ready()
    assert triton_client.is_model_ready("digits") and triton_client.is_model_ready(MODEL)
    assert not triton_client.is_model_ready("no-such-model")
    server = triton_client.get_server_metadata()
    assert server["name"] == "model-api" and "binary_tensor_data" in server["extensions"]
    digits = triton_client.get_model_metadata("digits")
    assert digits["inputs"] == [{"name": "pixels", "datatype": "FP32", "shape": [-1, 64]}]
    version = digits["versions"][0]
    assert triton_client.get_model_metadata("digits", model_version=version)["name"] == "digits"
    assert triton_client.get_model_metadata(MODEL)["outputs"][0]["datatype"] == "FP32"


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_digits_inference(
    triton_client: triton.InferenceServerClient, client: requests.Session, server: Server, binary: bool
) -> None:
    rows = digits_split().test_pixels[:20]
    outputs = [triton.InferRequestedOutput(name, binary_data=binary) for name in ("logits", "label")]
    result = triton_client.infer("digits", [pixels(rows, binary)], outputs=outputs, request_id="r-1")
    expected = reference(client, server, rows)
    assert result.get_response()["id"] == "r-1"
    assert np.array_equal(result.as_numpy("label"), expected["label"])
    assert np.allclose(result.as_numpy("logits"), expected["logits"], atol=1e-6)
    default = triton_client.infer("digits", [pixels(rows, True)])  # no outputs named: all, as raw bytes
    assert all("parameters" in output for output in default.get_response()["outputs"])
    assert np.array_equal(default.as_numpy("label"), expected["label"])


def test_embedding_inference_equals_the_openai_route(
    triton_client: triton.InferenceServerClient, client: requests.Session, server: Server
) -> None:
    values = ["A dog runs in the park.", "Zwölf Boxkämpfer jagen Viktor quer über den Sylter Deich."]
    openai = client.post(f"{server.url}/v1/embeddings", json={"input": values, "model": MODEL}).json()
    expected = np.asarray([item["embedding"] for item in openai["data"]], dtype=np.float32)
    for binary in (True, False):  # BYTES with 4-byte length prefixes, then JSON strings
        outputs = [triton.InferRequestedOutput("embedding", binary_data=binary)]
        result = triton_client.infer(MODEL, [texts(values, binary)], outputs=outputs)
        assert np.allclose(result.as_numpy("embedding"), expected, atol=1e-6), binary


ERRORS: list[tuple[str, Callable[[triton.InferenceServerClient], object], str, str]] = [
    ("unknown model metadata", lambda c: c.get_model_metadata("nope"), "404", "No model named 'nope'"),
    ("unknown version", lambda c: c.get_model_metadata("digits", model_version="7"), "404", "not '7'"),
    ("unknown model inference", lambda c: c.infer("nope", [pixels(np.zeros((1, 64)), True)]), "404", "nope"),
    ("wrong shape", lambda c: c.infer("digits", [pixels(np.zeros((1, 63)), True)]), "400", "[-1, 64]"),
    ("wrong input", lambda c: c.infer("digits", [texts(["a"], True)]), "400", "no input 'text'"),
    (
        "wrong datatype",
        lambda c: c.infer("digits", [pixels_as("FP64", np.zeros((1, 64)))]),
        "400",
        "expected FP32",
    ),
    (
        "unknown output",
        lambda c: c.infer(
            "digits",
            [pixels(np.zeros((1, 64)), True)],
            outputs=[triton.InferRequestedOutput("probabilities")],
        ),
        "400",
        "no output 'probabilities'",
    ),
    (
        "too many rows",
        lambda c: c.infer("digits", [pixels(np.zeros((LIMITS["max_inputs"] + 1, 64)), True)]),
        "413",
        f"at most {LIMITS['max_inputs']}",
    ),
    ("empty text", lambda c: c.infer(MODEL, [texts([""], True)]), "400", "Text 0 is empty"),
    ("infer on a GET route", lambda c: c.get_model_repository_index(), "404", "No such route"),
]


def pixels_as(datatype: str, rows: np.ndarray) -> triton.InferInput:
    tensor = triton.InferInput("pixels", list(rows.shape), datatype)
    tensor.set_data_from_numpy(rows.astype(np.float64), binary_data=True)
    return tensor


@pytest.mark.parametrize(("case", "call", "status", "words"), ERRORS, ids=[error[0] for error in ERRORS])
def test_every_error_is_an_inference_server_exception(
    triton_client: triton.InferenceServerClient,
    case: str,
    call: Callable[[triton.InferenceServerClient], object],
    status: str,
    words: str,
) -> None:
    with pytest.raises(InferenceServerException) as raised:
        call(triton_client)
    error = raised.value
    assert error.status() == status, str(error)
    assert isinstance(error.message(), str) and words in error.message()
    assert str(error) == f"[{status}] {error.message()}"  # shown without a crash


@pytest.fixture(scope="module")
def reverse_proxy(server: Server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningProxy]:
    work = tmp_path_factory.mktemp("reverse-proxy")
    proxy = start_proxy(work, "--set", f"mode=reverse:{server.url}", "--access-log", "-")
    try:
        yield proxy
    finally:
        proxy.stop()


def test_through_the_proxy_in_reverse_mode(
    reverse_proxy: RunningProxy, client: requests.Session, server: Server
) -> None:
    through = client_for(reverse_proxy.url)
    try:
        assert through.is_server_ready()
        assert through.get_model_metadata("digits")["name"] == "digits"
        rows = digits_split().test_pixels[:8]
        expected = reference(client, server, rows)
        for _ in range(2):  # the second may be answered by the cache
            result = through.infer("digits", [pixels(rows, True)])
            assert np.array_equal(result.as_numpy("label"), expected["label"])
            assert np.allclose(result.as_numpy("logits"), expected["logits"], atol=1e-6)
        with pytest.raises(InferenceServerException) as raised:
            through.get_model_metadata("nope")
        assert raised.value.status() == "404" and "No model named 'nope'" in raised.value.message()
    finally:
        through.close()
    lines = [json.loads(line) for line in reverse_proxy.log().splitlines() if line.startswith("{")]
    infers = [line for line in lines if line["path"] == "/v2/models/digits/infer"]
    assert [line["status"] for line in infers] == [200, 200]  # both went through the proxy
