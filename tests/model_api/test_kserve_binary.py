"""The binary tensor data extension and the KServe v2 error shape, in process (no sockets).

Requests are encoded and answers decoded by tritonclient's own codec (`generate_request_body`,
`InferResult.from_response_body`), so every datatype is checked against what Triton's client really
sends and reads. A fake model echoes one input of each datatype the model API serves.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any, Literal

import ml_dtypes
import numpy as np
import pytest
import tritonclient.http as triton
from fastapi.testclient import TestClient
from hypothesis import given
from hypothesis import strategies as st

from model_api.app import create_app
from model_api.models.registry import Registry, ServedModel
from model_api.settings import Settings
from model_api.tensors import (
    NUMPY_DTYPES,
    TensorError,
    TensorSpec,
    decode_binary_tensor,
    encode_binary_tensor,
)

# Every datatype a request may carry, with values that survive the trip exactly.
SAMPLES: dict[str, np.ndarray] = {
    "BOOL": np.array([[True, False, True], [False, False, True]]),
    "UINT8": np.array([[0, 7, 255], [1, 2, 3]], dtype=np.uint8),
    "UINT16": np.array([[0, 7, 65535], [1, 2, 3]], dtype=np.uint16),
    "UINT32": np.array([[0, 7, 2**32 - 1], [1, 2, 3]], dtype=np.uint32),
    "UINT64": np.array([[0, 7, 2**64 - 1], [1, 2, 3]], dtype=np.uint64),
    "INT8": np.array([[-128, 0, 127], [1, -2, 3]], dtype=np.int8),
    "INT16": np.array([[-32768, 0, 32767], [1, -2, 3]], dtype=np.int16),
    "INT32": np.array([[-(2**31), 0, 2**31 - 1], [1, -2, 3]], dtype=np.int32),
    "INT64": np.array([[-(2**63), 0, 2**63 - 1], [1, -2, 3]], dtype=np.int64),
    "FP16": np.array([[0.5, -1.25, 65504], [1, 2, 3]], dtype=np.float16),
    "BF16": np.array([[0.5, -1.25, 3.0e38], [1, 2, 3]], dtype=ml_dtypes.bfloat16),
    "FP32": np.array([[0.1, -1e-30, 3.4e38], [1, 2, 3]], dtype=np.float32),
    "FP64": np.array([[0.1, -1e-300, 1.7e308], [1, 2, 3]], dtype=np.float64),
    "BYTES": np.array([["a", "", "ünïcode"], ["tab\there", "x" * 300, "end"]], dtype=object),
}
JSON_DATATYPES = [datatype for datatype in SAMPLES if datatype not in ("BF16", "FP16")]


class Echo:
    """Returns each input as the output `out_<DATATYPE>` (BF16 comes back as the FP32 it is read into)."""

    name = "echo"
    kind: Literal["tensor"] = "tensor"
    platform = "fake"
    inputs = tuple(TensorSpec(datatype, datatype, (-1, 3)) for datatype in SAMPLES)
    outputs = tuple(
        TensorSpec(f"out_{datatype}", "FP32" if datatype == "BF16" else datatype, (-1, 3))
        for datatype in SAMPLES
    )
    batchable = True
    digest = "e" * 64

    def run_batch(self, rows: list[Any]) -> list[dict[str, np.ndarray]]:
        return [{f"out_{name}": array for name, array in row.items()} for row in rows]


class Doubler:
    """One FP32 input, two outputs: the input doubled and its row sums."""

    name = "double"
    kind: Literal["tensor"] = "tensor"
    platform = "fake"
    inputs = (TensorSpec("x", "FP32", (-1, 3)),)
    outputs = (TensorSpec("twice", "FP32", (-1, 3)), TensorSpec("sum", "FP64", (-1,)))
    batchable = True
    digest = "d" * 64

    def run_batch(self, rows: list[Any]) -> list[dict[str, np.ndarray]]:
        return [{"twice": row["x"] * 2, "sum": np.float64(row["x"].sum())} for row in rows]


@pytest.fixture(scope="module")
def app() -> Iterator[TestClient]:
    settings = Settings()
    registry = Registry([ServedModel(Echo(), settings), ServedModel(Doubler(), settings)])
    with TestClient(create_app(settings, registry)) as client:
        yield client


def triton_inputs(binary: Callable[[str], bool]) -> list[triton.InferInput]:
    inputs = []
    for datatype, sample in SAMPLES.items():
        tensor = triton.InferInput(datatype, list(sample.shape), datatype)
        tensor.set_data_from_numpy(sample, binary_data=binary(datatype))
        inputs.append(tensor)
    return inputs


def post(app: TestClient, body: bytes, json_size: int | None, model: str = "echo") -> Any:
    headers = {} if json_size is None else {"Inference-Header-Content-Length": str(json_size)}
    return app.post(f"/v2/models/{model}/infer", content=body, headers=headers)


def result_of(response: Any) -> triton.InferResult:
    assert response.status_code == 200, response.text
    header = response.headers.get("Inference-Header-Content-Length")
    return triton.InferResult.from_response_body(
        response.content, header_length=None if header is None else int(header)
    )


def expected(datatype: str) -> np.ndarray:
    sample = SAMPLES[datatype]
    if datatype == "BF16":
        return sample.astype(np.float32)
    if datatype == "BYTES":  # tritonclient reads BYTES back as bytes
        return np.vectorize(lambda text: text.encode(), otypes=[object])(sample)
    return sample


def test_every_datatype_round_trips_as_raw_bytes_both_ways(app: TestClient) -> None:
    body, json_size = triton.InferenceServerClient.generate_request_body(triton_inputs(lambda _: True))
    response = post(app, body, json_size)
    assert response.headers["Content-Type"] == "application/octet-stream"
    result = result_of(response)
    for datatype in SAMPLES:
        output = result.as_numpy(f"out_{datatype}")
        assert output is not None and np.array_equal(output, expected(datatype)), datatype
        described = result.get_output(f"out_{datatype}")
        assert "data" not in described and described["parameters"]["binary_data_size"] > 0


def test_json_and_raw_inputs_mix_in_one_request(app: TestClient) -> None:
    # tritonclient sends BF16 only as raw bytes; everything else goes as JSON here.
    body, json_size = triton.InferenceServerClient.generate_request_body(
        triton_inputs(lambda datatype: datatype == "BF16")
    )
    assert json_size is not None and len(body) - json_size == SAMPLES["BF16"].size * 2
    result = result_of(post(app, body, json_size))
    for datatype in SAMPLES:
        assert np.array_equal(result.as_numpy(f"out_{datatype}"), expected(datatype)), datatype


def test_outputs_choose_json_or_raw_one_by_one(app: TestClient) -> None:
    outputs = [
        triton.InferRequestedOutput("out_INT64", binary_data=False),
        triton.InferRequestedOutput("out_BYTES", binary_data=True),
    ]
    body, json_size = triton.InferenceServerClient.generate_request_body(
        triton_inputs(lambda _: True), outputs=outputs
    )
    result = result_of(post(app, body, json_size))
    described = {output["name"]: output for output in result.get_response()["outputs"]}
    assert list(described) == ["out_INT64", "out_BYTES"]
    assert described["out_INT64"]["data"] == SAMPLES["INT64"].reshape(-1).tolist()
    assert "data" not in described["out_BYTES"]
    assert np.array_equal(result.as_numpy("out_BYTES"), expected("BYTES"))


def test_the_wire_layout_of_a_binary_request_and_answer(app: TestClient) -> None:
    """What a proxy sees: N bytes of JSON, then each binary input's bytes in `inputs` order."""
    x = np.array([[1, 2, 3], [4, 5, 6]], dtype="<f4")
    header = {
        "inputs": [
            {"name": "x", "datatype": "FP32", "shape": [2, 3], "parameters": {"binary_data_size": 24}}
        ],
        "outputs": [{"name": "twice", "parameters": {"binary_data": True}}, {"name": "sum"}],
    }
    encoded = json.dumps(header).encode()
    response = post(app, encoded + x.tobytes(), len(encoded), model="double")
    assert response.status_code == 200, response.text
    assert response.headers["Content-Type"] == "application/octet-stream"
    json_length = int(response.headers["Inference-Header-Content-Length"])
    answer = json.loads(response.content[:json_length])
    assert answer["outputs"] == [
        {"name": "twice", "datatype": "FP32", "shape": [2, 3], "parameters": {"binary_data_size": 24}},
        {"name": "sum", "datatype": "FP64", "shape": [2], "data": [6.0, 15.0]},
    ]
    assert response.content[json_length:] == (x * 2).tobytes()
    # Without any binary output the answer is plain JSON, without the header.
    header["outputs"] = [{"name": "sum"}]
    encoded = json.dumps(header).encode()
    plain = post(app, encoded + x.tobytes(), len(encoded), model="double")
    assert "Inference-Header-Content-Length" not in plain.headers
    assert plain.json()["outputs"] == [{"name": "sum", "datatype": "FP64", "shape": [2], "data": [6.0, 15.0]}]


def test_binary_data_output_asks_for_every_output_raw(app: TestClient) -> None:
    x = np.ones((1, 3), dtype="<f4")
    header = {
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 3], "data": x.reshape(-1).tolist()}],
        "parameters": {"binary_data_output": True},
    }
    result = result_of(app.post("/v2/models/double/infer", json=header))
    assert np.array_equal(result.as_numpy("twice"), x * 2)
    assert np.array_equal(result.as_numpy("sum"), np.array([3.0]))
    assert all("data" not in output for output in result.get_response()["outputs"])


FRAMING_ERRORS = [
    ("header past the end", b'{"inputs": []}', "99", "it must be the number of JSON bytes"),
    ("header not a number", b'{"inputs": []}', "ten", "it must be the number of JSON bytes"),
    ("no JSON", b"", "0", "has no JSON"),
]


@pytest.mark.parametrize(
    ("case", "body", "header", "words"), FRAMING_ERRORS, ids=[c[0] for c in FRAMING_ERRORS]
)
def test_broken_framing_is_a_400_in_the_kserve_shape(
    app: TestClient, case: str, body: bytes, header: str, words: str
) -> None:
    response = app.post(
        "/v2/models/double/infer", content=body, headers={"Inference-Header-Content-Length": header}
    )
    assert response.status_code == 400
    assert set(response.json()) == {"error"} and words in response.json()["error"]


def one_input(parameters: dict[str, Any], **fields: Any) -> bytes:
    tensor = {"name": "x", "datatype": "FP32", "shape": [1, 3], "parameters": parameters, **fields}
    return json.dumps({"inputs": [tensor]}).encode()


BINARY_ERRORS = [
    ("bytes left over", one_input({"binary_data_size": 12}), b"\0" * 16, True, "belong to no input"),
    ("too few bytes", one_input({"binary_data_size": 12}), b"\0" * 8, True, "only 8 remain"),
    ("size and shape disagree", one_input({"binary_data_size": 8}), b"\0" * 8, True, "has 8 bytes"),
    ("size without the header", one_input({"binary_data_size": 12}), b"", False, "no Inference-Header"),
    ("data and size", one_input({"binary_data_size": 12}, data=[1, 2, 3]), b"\0" * 12, True, "give one"),
    ("negative size", one_input({"binary_data_size": -1}), b"", True, "give a byte count"),
]


@pytest.mark.parametrize(
    ("case", "header", "raw", "with_header", "words"), BINARY_ERRORS, ids=[c[0] for c in BINARY_ERRORS]
)
def test_inconsistent_binary_inputs_are_refused_with_the_reason(
    app: TestClient, case: str, header: bytes, raw: bytes, with_header: bool, words: str
) -> None:
    response = post(app, header + raw, len(header) if with_header else None, model="double")
    assert response.status_code == 400
    body = response.json()
    assert set(body) == {"error"} and isinstance(body["error"], str) and words in body["error"], body


@pytest.mark.parametrize(
    ("raw", "words"),
    [
        (b"\x05\0\0\0abc", "declares 5 bytes but only 3 remain"),
        (b"\x01\0\0\0a\x01\0", "stray bytes"),
        (b"\x02\0\0\0\xff\xfe", "not UTF-8"),
        (b"\x01\0\0\0a", "declares 2 elements"),
    ],
)
def test_bad_bytes_elements_are_refused(raw: bytes, words: str) -> None:
    with pytest.raises(TensorError, match=words):
        decode_binary_tensor(
            TensorSpec("text", "BYTES", (-1,)), "BYTES", [2] if words.endswith("elements") else [1], raw
        )


def test_every_v2_error_has_the_protocols_shape_and_v1_keeps_its_own(app: TestClient) -> None:
    answers = {
        "unknown model": (app.get("/v2/models/nope"), 404),
        "unknown model infer": (app.post("/v2/models/nope/infer", json={"inputs": []}), 404),
        "unknown version": (app.get("/v2/models/echo/versions/7"), 404),
        "schema violation": (app.post("/v2/models/echo/infer", json={"id": "no inputs"}), 400),
        "invalid JSON": (
            app.post("/v2/models/echo/infer", content=b"{", headers={"Content-Type": "application/json"}),
            400,
        ),
        "not JSON": (
            app.post("/v2/models/echo/infer", content=b"x", headers={"Content-Type": "text/plain"}),
            415,
        ),
        "unknown route": (app.get("/v2/nothing/here"), 404),
        "wrong method": (app.delete("/v2/health/live"), 405),
    }
    for case, (response, status) in answers.items():
        assert response.status_code == status, (case, response.text)
        body = response.json()
        assert set(body) == {"error"} and isinstance(body["error"], str) and len(body["error"]) > 10, case
    openai = app.post("/v1/embeddings", json={"input": "a", "model": "nope"})
    assert openai.status_code == 404 and openai.json()["error"]["code"] == "model_not_found"


@pytest.mark.parametrize("datatype", [d for d in NUMPY_DTYPES if d not in ("BF16", "BYTES")])
@given(data=st.data())
def test_raw_bytes_decode_to_the_array_encoded(datatype: str, data: st.DataObject) -> None:
    dtype = np.dtype(NUMPY_DTYPES[datatype])
    count = data.draw(st.integers(0, 6))
    raw = data.draw(st.binary(min_size=count * dtype.itemsize, max_size=count * dtype.itemsize))
    array = np.frombuffer(raw, dtype=dtype.newbyteorder("<"))
    if datatype == "BOOL":
        array = array.view(np.uint8) != 0
    decoded = decode_binary_tensor(
        TensorSpec("x", datatype, (-1,)), datatype, [count], encode_binary_tensor(datatype, array)
    )
    assert decoded.dtype == dtype and np.array_equal(decoded, array, equal_nan=dtype.kind == "f")


@given(st.lists(st.text(), max_size=5))
def test_bytes_elements_round_trip(texts: list[str]) -> None:
    array = np.empty(len(texts), dtype=object)
    array[:] = texts
    raw = encode_binary_tensor("BYTES", array)
    assert len(raw) == sum(4 + len(text.encode()) for text in texts)
    decoded = decode_binary_tensor(TensorSpec("t", "BYTES", (-1,)), "BYTES", [len(texts)], raw)
    assert decoded.tolist() == texts
