"""KServe v2 JSON tensors checked against a model's specs (pure numpy)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from model_api.tensors import TensorError, TensorSpec, datatype_of, decode_tensor, encode_tensor

PIXELS = TensorSpec("pixels", "FP32", (-1, 2))


def test_flat_and_nested_data_give_the_same_array() -> None:
    flat = decode_tensor(PIXELS, "FP32", [2, 2], [1, 2, 3, 4])
    nested = decode_tensor(PIXELS, "FP32", [2, 2], [[1, 2], [3, 4]])
    assert flat.dtype == np.float32
    assert flat.tolist() == nested.tolist() == [[1.0, 2.0], [3.0, 4.0]]


def test_bytes_tensors_hold_strings() -> None:
    spec = TensorSpec("text", "BYTES", (-1,))
    array = decode_tensor(spec, "BYTES", [2], ["a", "b c"])
    assert array.tolist() == ["a", "b c"]


@pytest.mark.parametrize(
    ("spec", "datatype", "shape", "data", "code", "expected"),
    [
        (PIXELS, "FP64", [1, 2], [1, 2], "wrong_datatype", "FP32"),
        (PIXELS, "FP32", [1, 3], [1, 2, 3], "wrong_shape", [-1, 2]),
        (PIXELS, "FP32", [2], [1, 2], "wrong_shape", [-1, 2]),
        (PIXELS, "FP32", [2, 2], [1, 2, 3], "wrong_shape", [-1, 2]),
        (PIXELS, "FP32", [1, -2], [], "wrong_shape", None),
        (PIXELS, "FP32", [1, 2], [1, "2"], "invalid_tensor_data", "FP32"),
        (PIXELS, "FP32", [1, 2], [1, True], "invalid_tensor_data", "FP32"),
        (PIXELS, "FP32", [1, 2], [[1], [2, 3]], "wrong_shape", [-1, 2]),
        (TensorSpec("ids", "INT32", (-1,)), "INT32", [1], [1.5], "invalid_tensor_data", "INT32"),
        (TensorSpec("ids", "INT32", (-1,)), "INT32", [1], [2**40], "invalid_tensor_data", "INT32"),
        (TensorSpec("ids", "UINT8", (-1,)), "UINT8", [1], [-1], "invalid_tensor_data", "UINT8"),
        (TensorSpec("mask", "BOOL", (-1,)), "BOOL", [1], [1], "invalid_tensor_data", "BOOL"),
        (TensorSpec("text", "BYTES", (-1,)), "BYTES", [1], [3], "invalid_tensor_data", "BYTES"),
    ],
)
def test_bad_tensors_are_refused_with_what_was_expected(
    spec: TensorSpec, datatype: str, shape: list[int], data: Any, code: str, expected: Any
) -> None:
    with pytest.raises(TensorError) as caught:
        decode_tensor(spec, datatype, shape, data)
    assert caught.value.code == code
    assert caught.value.expected == expected
    assert spec.name in caught.value.message


def test_messages_name_the_expected_datatype_and_shape() -> None:
    with pytest.raises(TensorError, match=r"expected FP32"):
        decode_tensor(PIXELS, "INT64", [1, 2], [1, 2])
    with pytest.raises(TensorError, match=r"expected \[-1, 2\]"):
        decode_tensor(PIXELS, "FP32", [1, 4], [1, 2, 3, 4])


@given(
    rows=st.integers(1, 5),
    values=st.lists(st.floats(-1e6, 1e6, allow_nan=False, width=32), min_size=10, max_size=10),
)
def test_encoding_then_decoding_gives_the_array_back(rows: int, values: list[float]) -> None:
    array = np.asarray(values[: rows * 2], dtype=np.float32).reshape(rows, 2)
    encoded = encode_tensor("pixels", datatype_of(array), array)
    assert encoded["shape"] == [rows, 2]
    decoded = decode_tensor(PIXELS, encoded["datatype"], encoded["shape"], encoded["data"])
    assert np.array_equal(decoded, array)


def test_datatypes_of_model_outputs() -> None:
    assert datatype_of(np.zeros(1, dtype=np.int64)) == "INT64"
    assert datatype_of(np.zeros(1, dtype=np.float32)) == "FP32"
    assert datatype_of(np.zeros(1, dtype=np.bool_)) == "BOOL"
    assert datatype_of(np.array(["a"], dtype=object)) == "BYTES"
