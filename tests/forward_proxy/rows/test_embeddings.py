"""OpenAI embedding batches: which inputs split into rows, what shapes a row's key, and exact reassembly."""

from __future__ import annotations

import json
from typing import Any

import pytest

from forward_proxy.cache.rows import AnswerMismatch, protocol_of, split_embeddings
from tests.forward_proxy.rows.fakes import embeddings_answer

REQUEST = {
    "model": "all-MiniLM-L6-v2",
    "input": ["The cat sat on the mat.", "Invoices are due in 30 days.", "The cat sat on the mat."],
    "encoding_format": "float",
}


def key_of(document: dict[str, Any], position: int = 0, ignore: tuple[str, ...] = ()) -> bytes:
    batch = split_embeddings(document, ignore)
    assert batch is not None
    return batch.rows[position].key


@pytest.mark.parametrize(
    ("given", "rows"),
    [
        ("one text", ["one text"]),
        (["a", "b"], ["a", "b"]),
        ([101, 2023, 102], [[101, 2023, 102]]),
        ([[101, 102], [101, 2023, 102]], [[101, 102], [101, 2023, 102]]),
    ],
)
def test_inputs_split_into_rows(given: Any, rows: list[Any]) -> None:
    batch = split_embeddings({"input": given})
    assert batch is not None
    assert [row.content for row in batch.rows] == rows


@pytest.mark.parametrize(
    "document",
    [
        {"input": ""},
        {"input": []},
        {"input": ["fine", ""]},
        {"input": [[101], []]},
        {"input": ["text", [101, 102]]},
        {"input": [1, "two"]},
        {"input": [True, False]},
        {"input": [1.5, 2.5]},
        {"input": None},
        {"model": "m"},
        ["not", "an", "object"],
    ],
)
def test_malformed_inputs_are_not_split(document: Any) -> None:
    """The upstream's own error names the problem; the proxy sends such requests whole."""
    assert split_embeddings(document) is None


def test_token_rows_know_their_tokens_and_texts_do_not() -> None:
    batch = split_embeddings({"input": [[101, 7592, 2088, 102], [101, 102]]})
    assert batch is not None and [row.tokens for row in batch.rows] == [4, 2]
    texts = split_embeddings(REQUEST)
    assert texts is not None and [row.tokens for row in texts.rows] == [None, None, None]


def test_the_rest_of_the_body_is_part_of_every_row_key() -> None:
    base = key_of(REQUEST)
    for change in ({"model": "other"}, {"encoding_format": "base64"}, {"dimensions": 64}, {"user": "u1"}):
        assert key_of({**REQUEST, **change}) != base, change
    reordered = {"encoding_format": "float", "input": list(REQUEST["input"]), "model": "all-MiniLM-L6-v2"}
    assert key_of(reordered) == base
    assert key_of({**REQUEST, "input": "The cat sat on the mat."}) == base  # a lone string is the same row


def test_ignored_fields_are_left_out_of_row_keys() -> None:
    assert key_of({**REQUEST, "user": "u1"}, ignore=("user",)) == key_of(REQUEST, ignore=("user",))
    assert key_of({**REQUEST, "user": "u1"}) != key_of(REQUEST)


def test_text_and_token_rows_never_share_a_key() -> None:
    assert key_of({"input": ["[101, 102]"]}) != key_of({"input": [[101, 102]]})


def test_repeated_rows_are_sent_once_in_order() -> None:
    batch = split_embeddings(REQUEST)
    assert batch is not None
    assert batch.first_positions([2, 1, 0]) == [2, 1]
    assert json.loads(batch.request_body(batch.first_positions(range(3)))) == {
        **REQUEST,
        "input": ["The cat sat on the mat.", "Invoices are due in 30 days."],
    }


def test_fresh_answers_become_single_row_answers_with_their_own_usage() -> None:
    batch = split_embeddings(REQUEST)
    assert batch is not None
    body, header = embeddings_answer(json.loads(batch.request_body([0, 1])))
    fresh = batch.fresh_answers([0, 1], body, header)
    single, _ = embeddings_answer({**REQUEST, "input": ["Invoices are due in 30 days."]})
    assert fresh.answers[1].body() == single
    assert [answer.tokens for answer in fresh.answers] == [8, 8]
    assert not any(answer.estimated for answer in fresh.answers)


def test_without_per_row_counts_a_lone_text_row_gets_the_total() -> None:
    batch = split_embeddings({"input": ["known already", "hello world"]})
    assert batch is not None
    body, _ = embeddings_answer(json.loads(batch.request_body([1])))
    fresh = batch.fresh_answers([1], body, None)
    assert [answer.tokens for answer in fresh.answers] == [4]


def test_without_per_row_counts_several_texts_share_the_total_and_merge_exactly() -> None:
    """An upstream that reports only the batch's usage (OpenAI, vLLM, TEI): each text gets a share by
    length, marked estimated; together they add up to the upstream's total, so the merge is exact."""
    batch = split_embeddings({"input": ["one two", "three"]})
    assert batch is not None
    body, _ = embeddings_answer(json.loads(batch.request_body([0, 1])))
    fresh = batch.fresh_answers([0, 1], body, "garbage")
    assert [answer.estimated for answer in fresh.answers] == [True, True]
    assert sum(answer.tokens or 0 for answer in fresh.answers) == 7
    assert batch.merge(fresh.answers) == body


def test_a_header_that_does_not_add_up_is_not_trusted() -> None:
    batch = split_embeddings({"input": ["one two", "three"]})
    assert batch is not None
    body, _ = embeddings_answer(json.loads(batch.request_body([0, 1])))
    fresh = batch.fresh_answers([0, 1], body, "1,1")
    assert [answer.estimated for answer in fresh.answers] == [True, True]
    assert sum(answer.tokens or 0 for answer in fresh.answers) == 7  # the total, not the header's 2


def test_an_estimated_row_that_repeats_counts_its_share_each_time() -> None:
    batch = split_embeddings({"input": ["one two", "three", "one two"]})
    assert batch is not None
    body, _ = embeddings_answer(json.loads(batch.request_body([0, 1])))
    fresh = batch.fresh_answers([0, 1], body, None)
    merged = json.loads(batch.merge([fresh.answers[0], fresh.answers[1], fresh.answers[0]]))
    shares = [answer.tokens or 0 for answer in fresh.answers]
    assert merged["usage"]["prompt_tokens"] == 2 * shares[0] + shares[1]


def test_merge_renumbers_indices_and_sums_usage() -> None:
    batch = split_embeddings(REQUEST)
    assert batch is not None
    body, header = embeddings_answer(json.loads(batch.request_body([1, 0])))  # sent in another order
    fresh = batch.fresh_answers([1, 0], body, header)
    body = batch.merge([fresh.answers[1], fresh.answers[0], fresh.answers[1]])
    assert body == embeddings_answer(REQUEST)[0]
    merged = json.loads(body)
    assert [item["index"] for item in merged["data"]] == [0, 1, 2]
    assert merged["data"][0]["embedding"] == merged["data"][2]["embedding"]
    assert merged["usage"] == {"prompt_tokens": 24, "total_tokens": 24}
    assert b"e-0" not in body and b"e-" in body  # numbers keep the upstream's own writing


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"<html>502</html>", "not JSON"),
        (b"[]", "not a JSON object"),
        (b'{"data": [], "usage": {"prompt_tokens": 0, "total_tokens": 0}}', "0 embeddings for 2"),
        (b'{"data": [{"index": 0}, {"index": 0}], "usage": {"prompt_tokens": 2}}', "indices"),
        (b'{"data": [{"index": 0}, {"index": 1}]}', "usage"),
        (
            b'{"data": [{"index": 0}, {"index": 1}], "usage": {"prompt_tokens": 2, "total_tokens": 9}}',
            "split",
        ),
    ],
)
def test_answers_that_do_not_fit_are_refused(body: bytes, message: str) -> None:
    batch = split_embeddings({"input": ["a", "b"]})
    assert batch is not None
    with pytest.raises(AnswerMismatch, match=message):
        batch.fresh_answers([0, 1], body)


def test_stored_content_that_is_not_a_row_answer_is_a_miss() -> None:
    batch = split_embeddings({"input": ["a"]})
    assert batch is not None
    assert batch.load_answer(b"not json") is None
    assert batch.load_answer(embeddings_answer({"input": ["a", "b"]})[0]) is None
    loaded = batch.load_answer(embeddings_answer({"input": ["a"]})[0])
    assert loaded is not None and loaded.tokens == 3


def test_protocol_of_paths() -> None:
    assert protocol_of("/v1/embeddings") == "openai-embeddings"
    assert protocol_of("/v2/models/digits/versions/3/infer") == "kserve-v2-infer"
    assert protocol_of("/v1/chat/completions") is None
    assert protocol_of("/v2/models/digits/ready") is None
