"""KServe v2 batches: rows along the first dimension of every input, and outputs put back together."""

from __future__ import annotations

import json
from typing import Any

import pytest

from forward_proxy.cache.rows import AnswerMismatch, split_inference
from tests.forward_proxy.rows.fakes import inference_answer

PIXELS = [[0.0, 0.5, 1.0, 0.25], [1.0, 1.0, 0.0, 0.0], [0.0, 0.5, 1.0, 0.25]]
REQUEST: dict[str, Any] = {
    "id": "batch-17",
    "inputs": [{"name": "features", "datatype": "FP32", "shape": [3, 4], "data": PIXELS}],
}


def batch_of(document: dict[str, Any], ignore: tuple[str, ...] = ()) -> Any:
    batch = split_inference(document, ignore)
    assert batch is not None
    return batch


def test_rows_are_slices_along_the_first_dimension() -> None:
    batch = batch_of(REQUEST)
    assert [row.content for row in batch.rows] == [(pixels,) for pixels in PIXELS]
    assert batch.rows[0].key == batch.rows[2].key != batch.rows[1].key


def test_every_input_is_sliced_at_the_same_row() -> None:
    batch = batch_of(
        {
            "inputs": [
                {"name": "features", "datatype": "FP32", "shape": [2, 2], "data": [1, 2, 3, 4]},
                {
                    "name": "weights",
                    "datatype": "INT64",
                    "shape": [2, 2, 1],
                    "data": [[[5], [6]], [[7], [8]]],
                },
            ]
        }
    )
    assert [row.content for row in batch.rows] == [([1, 2], [5, 6]), ([3, 4], [7, 8])]


def test_key_ignores_id_layout_and_input_order_but_not_what_shapes_the_answer() -> None:
    base = batch_of(REQUEST).rows[1].key
    flat = {
        **REQUEST,
        "id": "other",
        "inputs": [{**REQUEST["inputs"][0], "data": [value for row in PIXELS for value in row]}],
    }
    assert batch_of(flat).rows[1].key == base
    two = [
        {"name": "a", "datatype": "FP32", "shape": [1, 1], "data": [1]},
        {"name": "b", "datatype": "FP32", "shape": [1, 1], "data": [2]},
    ]
    assert batch_of({"inputs": two}).rows[0].key == batch_of({"inputs": two[::-1]}).rows[0].key
    for change in (
        {"outputs": [{"name": "label"}]},
        {"parameters": {"temperature": 2}},
        {"inputs": [{**REQUEST["inputs"][0], "datatype": "FP64"}]},
        {"inputs": [{**REQUEST["inputs"][0], "shape": [3, 2, 2]}]},
    ):
        assert batch_of({**REQUEST, **change}).rows[1].key != base, change


@pytest.mark.parametrize(
    "document",
    [
        {"inputs": []},
        {"inputs": [{"name": "x", "datatype": "FP32", "shape": [0, 4], "data": []}]},
        {"inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 2], "data": [1, 2, 3]}]},
        {"inputs": [{"name": "x", "datatype": "FP32", "shape": [], "data": [1]}]},
        {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": 1}]},
        {"inputs": [{"name": "x", "datatype": "FP32", "shape": [-1], "data": [1]}]},
        {"inputs": [{"name": "x", "datatype": "FP32", "shape": [2]}]},
        {
            "inputs": [
                {"name": "x", "datatype": "FP32", "shape": [2], "data": [1, 2]},
                {"name": "y", "datatype": "FP32", "shape": [3], "data": [1, 2, 3]},
            ]
        },
        {
            "inputs": [
                {"name": "x", "datatype": "FP32", "shape": [1], "data": [1]},
                {"name": "x", "datatype": "FP32", "shape": [1], "data": [2]},
            ]
        },
        {
            "inputs": [{"name": "x", "datatype": "FP32", "shape": [2], "data": [1, 2]}],
            "outputs": [{"name": "y", "parameters": {"binary_data": True}}],
        },
        {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "parameters": {"binary_data_size": 4}}]},
    ],
)
def test_what_is_not_a_json_batch_is_not_split(document: dict[str, Any]) -> None:
    assert split_inference(document) is None


def test_sub_batch_request_keeps_everything_but_the_rows() -> None:
    batch = batch_of({**REQUEST, "outputs": [{"name": "score"}]})
    sent = json.loads(batch.request_body([1]))
    assert sent == {
        "id": "batch-17",
        "inputs": [{"name": "features", "datatype": "FP32", "shape": [1, 4], "data": PIXELS[1]}],
        "outputs": [{"name": "score"}],
    }


def test_merge_restores_the_batch_dimension_and_the_requests_id() -> None:
    batch = batch_of(REQUEST)
    sent = batch.first_positions(range(3))
    assert sent == [0, 1]
    fresh = batch.fresh_answers(sent, inference_answer(json.loads(batch.request_body(sent))))
    assert [answer.document["outputs"][0]["shape"] for answer in fresh.answers] == [[1, 2], [1, 2]]
    merged = batch.merge([fresh.answers[0], fresh.answers[1], fresh.answers[0]])
    assert merged == inference_answer(REQUEST)
    assert json.loads(merged)["outputs"][1] == {
        "name": "label",
        "datatype": "INT64",
        "shape": [3],
        "data": [0, 0, 0],
    }


def test_rows_stored_under_another_id_merge_with_this_requests_id() -> None:
    earlier = batch_of({**REQUEST, "id": "yesterday"})
    stored = [a.body() for a in earlier.fresh_answers([0, 1, 2], inference_answer(earlier.document)).answers]
    for document in (REQUEST, {"inputs": REQUEST["inputs"]}):
        batch = batch_of(document)
        loaded = [batch.load_answer(content) for content in stored]
        assert all(answer is not None for answer in loaded)
        assert batch.merge(loaded) == inference_answer(document)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"nope", "not JSON"),
        (b'{"outputs": []}', "no outputs"),
        (b'{"outputs": [{"name": "y", "shape": [3, 2], "data": [1, 2, 3, 4, 5, 6]}]}', "not have 2 rows"),
        (b'{"outputs": [{"name": "y", "shape": [2, 2], "data": [1, 2, 3]}]}', "fill"),
    ],
)
def test_answers_that_do_not_fit_are_refused(body: bytes, message: str) -> None:
    with pytest.raises(AnswerMismatch, match=message):
        batch_of(REQUEST).fresh_answers([0, 1], body)


def test_row_answers_of_different_layouts_are_not_merged() -> None:
    batch = batch_of({"inputs": [{"name": "features", "datatype": "FP32", "shape": [2, 1], "data": [1, 2]}]})
    one = batch.load_answer(
        b'{"outputs": [{"name": "y", "datatype": "FP32", "shape": [1, 2], "data": [1, 2]}]}'
    )
    other = batch.load_answer(
        b'{"outputs": [{"name": "y", "datatype": "FP32", "shape": [1, 1], "data": [1]}]}'
    )
    assert one is not None and other is not None
    with pytest.raises(ValueError, match="disagree"):
        batch.merge([one, other])


def test_stored_content_that_is_not_a_row_answer_is_a_miss() -> None:
    batch = batch_of(REQUEST)
    assert batch.load_answer(b"[]") is None
    assert batch.load_answer(inference_answer(REQUEST)) is None  # three rows, not one
