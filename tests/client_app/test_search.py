"""Pure pieces of `client_app.search`: reading documents, batching, cosine ranking."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from client_app.client import InputError
from client_app.search import batched, cosine, load_documents, rank

vectors = st.lists(st.floats(-100, 100, allow_nan=False), min_size=3, max_size=3)


def test_documents_one_per_line_blank_lines_skipped(tmp_path: Path) -> None:
    path = tmp_path / "docs.txt"
    path.write_text("  first  \n\n\tsecond\n   \nthird")
    assert load_documents(path) == ["first", "second", "third"]


def test_documents_as_a_json_list(tmp_path: Path) -> None:
    path = tmp_path / "docs.json"
    path.write_text('  ["a", " b ", ""]')
    assert load_documents(path) == ["a", "b"]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("", "holds no documents"),
        ("\n  \n", "holds no documents"),
        ("[1, 2]", "must be a JSON list of strings"),
        ("[not json", "starts like a JSON list but is not valid JSON"),
    ],
)
def test_unusable_documents_files(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "docs"
    path.write_text(content)
    with pytest.raises(InputError, match=message):
        load_documents(path)


def test_the_shipped_sample_has_thirty_documents() -> None:
    sample = Path(__file__).resolve().parents[2] / "client_app" / "data" / "docs.txt"
    documents = load_documents(sample)
    assert len(documents) == 30 and len(set(documents)) == 30


def test_batched() -> None:
    assert batched([1, 2, 3, 4, 5], 2) == [[1, 2], [3, 4], [5]]
    assert batched([], 3) == []
    with pytest.raises(ValueError):
        batched([1], 0)


def test_cosine_known_values() -> None:
    assert cosine([1, 0], [0, 1]) == 0.0
    assert cosine([1, 1], [2, 2]) == pytest.approx(1.0)
    assert cosine([1, 0], [-3, 0]) == pytest.approx(-1.0)
    assert cosine([1, 1], [1, 0]) == pytest.approx(1 / math.sqrt(2))
    assert cosine([0, 0], [1, 2]) == 0.0
    with pytest.raises(ValueError):
        cosine([1], [1, 2])


@given(vectors, vectors)
def test_cosine_is_symmetric_and_bounded(a: list[float], b: list[float]) -> None:
    assert cosine(a, b) == pytest.approx(cosine(b, a))
    assert -1.0 - 1e-9 <= cosine(a, b) <= 1.0 + 1e-9


def test_rank_best_first_ties_by_position() -> None:
    documents = [[0, 1], [1, 0], [1, 1], [2, 0]]
    assert rank([1, 0], documents, top=3) == [(1, 1.0), (3, 1.0), (2, pytest.approx(1 / math.sqrt(2)))]
    assert rank([1, 0], documents, top=0) == []
    assert len(rank([1, 0], documents, top=10)) == 4


@given(vectors, st.lists(vectors, max_size=8), st.integers(0, 10))
def test_rank_is_sorted_and_bounded(query: list[float], documents: list[list[float]], top: int) -> None:
    ranked = rank(query, documents, top)
    assert len(ranked) == min(top, len(documents))
    scores = [score for _, score in ranked]
    assert scores == sorted(scores, reverse=True)
    if ranked:
        assert ranked[0][1] == max(cosine(query, d) for d in documents)
