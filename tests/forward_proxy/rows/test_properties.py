"""Properties: splitting loses nothing, and merging row answers gives the model's own answer, byte for byte."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from forward_proxy.cache.rows import Batch, RowAnswer, flatten, split_embeddings, split_inference
from tests.forward_proxy.rows.fakes import embedding_rows, embeddings_answer, inference_answer

texts = st.sampled_from(["alpha", "beta gamma", "delta", "épsilon ζ", "a b c d", "x"])
token_rows = st.lists(st.integers(0, 30521), min_size=1, max_size=5)
inputs = st.one_of(
    texts,
    st.lists(texts, min_size=1, max_size=8),
    token_rows,
    st.lists(st.sampled_from([[101, 102], [101, 7592, 102], [5, 6, 7, 8]]), min_size=1, max_size=6),
)
embedding_requests = st.fixed_dictionaries(
    {"input": inputs},
    optional={
        "model": st.sampled_from(["all-MiniLM-L6-v2", "other"]),
        "encoding_format": st.sampled_from(["float", "base64"]),
        "dimensions": st.integers(1, 8),
        "user": st.just("team-a"),
    },
)


@st.composite
def inference_requests(draw: st.DrawFn) -> dict[str, Any]:
    rows = draw(st.integers(1, 6))
    width = draw(st.integers(1, 3))
    values = st.sampled_from([0.5, 1.0, -2.25, 3.0])
    features = [draw(st.lists(values, min_size=width, max_size=width)) for _ in range(rows)]
    nested = draw(st.booleans())
    document: dict[str, Any] = {
        "inputs": [
            {
                "name": "features",
                "datatype": "FP32",
                "shape": [rows, width],
                "data": features if nested else [value for row in features for value in row],
            }
        ]
    }
    if draw(st.booleans()):
        weights = [draw(st.sampled_from([1, 2])) for _ in range(rows * 2)]
        document["inputs"].insert(
            0, {"name": "weights", "datatype": "INT64", "shape": [rows, 2], "data": weights}
        )
    if draw(st.booleans()):
        document["id"] = draw(st.sampled_from(["req-1", "req-2"]))
    if draw(st.booleans()):
        document["outputs"] = [{"name": name} for name in draw(st.permutations(["score", "label"]))]
    return document


Answer = Callable[[dict[str, Any]], tuple[bytes, str | None]]


def through_row_cache(batch: Batch, store: dict[bytes, bytes], answer: Answer, *, dedupe: bool) -> bytes:
    """What the proxy does: known rows from `store`, the rest upstream in one request, new rows stored."""
    known = {
        position: loaded
        for position, row in enumerate(batch.rows)
        if row.key in store and (loaded := batch.load_answer(store[row.key])) is not None
    }
    missing = [position for position in range(len(batch.rows)) if position not in known]
    sent = batch.first_positions(missing) if dedupe else missing
    answers: dict[int, RowAnswer] = dict(known)
    if sent:
        body, header = answer(json.loads(batch.request_body(sent)))
        fresh = batch.fresh_answers(sent, body, header)
        by_key = {}
        for position, row_answer in zip(sent, fresh.answers, strict=True):
            answers[position] = row_answer
            by_key[batch.rows[position].key] = row_answer
            store[batch.rows[position].key] = row_answer.body()
        for position in missing:
            answers.setdefault(position, by_key[batch.rows[position].key])
    return batch.merge([answers[position] for position in range(len(batch.rows))])


@settings(max_examples=150, deadline=None)
@given(embedding_requests)
def test_embeddings_round_trip(document: dict[str, Any]) -> None:
    batch = split_embeddings(document)
    assert batch is not None
    again = json.loads(batch.request_body(range(len(batch.rows))))
    assert again == {**document, "input": embedding_rows(document["input"])}
    assert list(again) == list(document)  # the client's field order is kept


@settings(max_examples=150, deadline=None)
@given(inference_requests())
def test_inference_round_trip(document: dict[str, Any]) -> None:
    batch = split_inference(document)
    assert batch is not None
    again = json.loads(batch.request_body(range(len(batch.rows))))
    assert [{**given, "data": flatten(given["data"])} for given in document["inputs"]] == again["inputs"]
    assert {name: value for name, value in again.items() if name != "inputs"} == {
        name: value for name, value in document.items() if name != "inputs"
    }


@settings(max_examples=150, deadline=None)
@given(st.lists(embedding_requests, min_size=1, max_size=4), st.booleans())
def test_embeddings_merge_equals_whole_answer(documents: list[dict[str, Any]], header: bool) -> None:
    store: dict[bytes, bytes] = {}

    def answer(document: dict[str, Any]) -> tuple[bytes, str | None]:
        body, counts = embeddings_answer(document)
        return body, counts if header else None

    for document in documents:
        batch = split_embeddings(document)
        assert batch is not None
        merged = through_row_cache(batch, store, answer, dedupe=True)
        whole = embeddings_answer(document)[0]
        if header:  # every row's own count known: the very bytes of the model's answer
            assert merged == whole
        else:  # shares of batch totals (X-Cache-Usage: estimated): all but usage is the model's answer
            assert {**json.loads(merged), "usage": None} == {**json.loads(whole), "usage": None}


@settings(max_examples=150, deadline=None)
@given(st.lists(inference_requests(), min_size=1, max_size=4))
def test_inference_merge_equals_whole_answer(documents: list[dict[str, Any]]) -> None:
    store: dict[bytes, bytes] = {}
    for document in documents:
        batch = split_inference(document)
        assert batch is not None
        merged = through_row_cache(batch, store, lambda sub: (inference_answer(sub), None), dedupe=True)
        assert merged == inference_answer(document)


@settings(max_examples=100, deadline=None)
@given(embedding_requests, embedding_requests)
def test_same_row_same_key_only_when_the_rest_agrees(first: dict[str, Any], second: dict[str, Any]) -> None:
    a, b = split_embeddings(first), split_embeddings(second)
    assert a is not None and b is not None
    rest_a = {name: value for name, value in first.items() if name != "input"}
    rest_b = {name: value for name, value in second.items() if name != "input"}
    for row_a in a.rows:
        for row_b in b.rows:
            assert (row_a.key == row_b.key) == (row_a.content == row_b.content and rest_a == rest_b)
