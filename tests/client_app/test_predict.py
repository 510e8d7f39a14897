"""Pure pieces of `client_app.predict`: shapes from metadata, input rows, reading classes."""

from __future__ import annotations

import math
from collections import Counter

import pytest

from client_app.client import ClientError, InputError, TensorSpec
from client_app.predict import builtin_samples, infer_inputs, parse_rows, read_classes, tensor_shape


@pytest.mark.parametrize(
    ("declared", "rows", "row_size", "expected"),
    [
        ([-1, 64], 3, 64, [3, 64]),
        ([-1, 8, 8], 2, 64, [2, 8, 8]),
        ([-1, 1, 8, 8], 1, 64, [1, 1, 8, 8]),
        ([-1, -1], 5, 64, [5, 64]),
        ([-1, 8, -1], 1, 64, [1, 8, 8]),
        ([4, 64], 4, 64, [4, 64]),
    ],
)
def test_tensor_shape(declared: list[int], rows: int, row_size: int, expected: list[int]) -> None:
    assert tensor_shape(TensorSpec("x", "FP32", declared), rows, row_size) == expected


@pytest.mark.parametrize(
    ("declared", "rows", "row_size", "message"),
    [
        ([-1, 64], 1, 63, "cannot hold rows of 63 values"),
        ([-1, 8, 8], 1, 60, "cannot hold rows of 60 values"),
        ([-1, -1, -1], 1, 64, "cannot hold rows of 64 values"),
        ([-1, 7, -1], 1, 64, "cannot hold rows of 64 values"),
        ([1, 64], 2, 64, "fixed batch of 1 rows"),
    ],
)
def test_tensor_shape_refusals(declared: list[int], rows: int, row_size: int, message: str) -> None:
    with pytest.raises(InputError, match=message):
        tensor_shape(TensorSpec("x", "FP32", declared), rows, row_size)


def test_infer_inputs_follow_the_declared_datatype() -> None:
    rows = [[1.4, 2.6], [3.0, 0.0]]
    (floats,) = infer_inputs(TensorSpec("in", "FP32", [-1, 2]), rows)
    assert floats == {"name": "in", "shape": [2, 2], "datatype": "FP32", "data": [1.4, 2.6, 3.0, 0.0]}
    (ints,) = infer_inputs(TensorSpec("in", "INT64", [-1, 2]), rows)
    assert ints["data"] == [1, 3, 3, 0] and all(type(v) is int for v in ints["data"])
    (bools,) = infer_inputs(TensorSpec("in", "BOOL", [-1, 2]), rows)
    assert bools["data"] == [True, True, True, False]
    with pytest.raises(ClientError, match="datatype BYTES"):
        infer_inputs(TensorSpec("in", "BYTES", [-1, 2]), rows)


def test_read_classes_from_scores_ids_and_nested_data() -> None:
    logits = {"name": "logits", "data": [0.0, 2.0, 1.0, 5.0, 0.0, 0.0]}
    classes = read_classes(logits, 2)
    assert [c for c, _ in classes] == [1, 0]
    assert classes[1][1] == pytest.approx(1 / (1 + 2 * math.exp(-5)))  # softmax of the logits [5, 0, 0]
    probabilities = {"name": "p", "data": [[0.2, 0.8], [0.6, 0.4]]}
    assert read_classes(probabilities, 2) == [(1, 0.8), (0, 0.6)]
    ids = {"name": "label", "data": [3, 9]}
    assert read_classes(ids, 2) == [(3, None), (9, None)]
    with pytest.raises(ClientError, match="not a whole number per row"):
        read_classes({"name": "x", "data": [1.0, 2.0, 3.0]}, 2)
    with pytest.raises(ClientError, match="holds no data"):
        read_classes({"name": "x", "data": []}, 2)


def test_parse_rows() -> None:
    assert [s.pixels for s in parse_rows("[1, 2.5]")] == [[1.0, 2.5]]
    assert [s.pixels for s in parse_rows("[[1, 2], [3, 4]]")] == [[1.0, 2.0], [3.0, 4.0]]
    for bad in ("[]", "[[1], [2, 3]]", '["a"]', "[true]", "{}", "nope"):
        with pytest.raises(InputError):
            parse_rows(bad)


def test_builtin_samples() -> None:
    samples = builtin_samples(20)
    assert Counter(s.label for s in samples) == {digit: 2 for digit in range(10)}
    assert all(len(s.pixels) == 64 and all(0 <= v <= 16 for v in s.pixels) for s in samples)
    assert builtin_samples(3) == samples[:3]
    with pytest.raises(InputError, match="1 to 20"):
        builtin_samples(21)
