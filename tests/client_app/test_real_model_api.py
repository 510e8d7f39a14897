"""`client-app` against the real model API (`model-api serve` from `.venv-model`: MiniLM and the digits model)."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from tests.client_app.conftest import client_app
from tests.support.model_server import export_digits, running_model_api

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def model_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    work = tmp_path_factory.mktemp("model-api")
    digits = export_digits(work / "digits.pt2")
    with running_model_api(
        work, "--device", "cpu", "--model", "all-MiniLM-L6-v2", "--model", f"digits={digits}"
    ) as url:
        yield url


def test_embed_gives_384_dimensions_and_the_same_vector_for_the_same_text(model_api: str) -> None:
    result = client_app(
        "--api-url", model_api, "embed", "a cat on a mat", "the stock market", "a cat on a mat", "--json"
    )
    assert result.returncode == 0, result.stderr
    data = sorted(json.loads(result.stdout)["data"], key=lambda item: item["index"])
    assert [len(item["embedding"]) for item in data] == [384, 384, 384]
    assert data[0]["embedding"] == data[2]["embedding"] != data[1]["embedding"]
    summary = client_app("--api-url", model_api, "embed", "hello world")
    assert summary.returncode == 0, summary.stderr
    assert "embeddings: 1   dims: 384" in summary.stdout
    assert "X-Model-Version: " in summary.stdout


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("how do I change my password", "To reset your password"),
        ("animals that live in the sea", "Dolphins use echolocation"),
        ("when is the bill due", "Invoices are sent by email"),
    ],
)
def test_search_ranks_the_relevant_document_first(model_api: str, query: str, expected: str) -> None:
    result = client_app("--api-url", model_api, "search", query, "--top", "3", "--json")
    assert result.returncode == 0, result.stderr
    matches = json.loads(result.stdout)["matches"]
    assert matches[0]["document"].startswith(expected), matches
    assert matches[0]["score"] > matches[1]["score"] + 0.1


def test_predict_classifies_the_built_in_digits(model_api: str) -> None:
    result = client_app("--api-url", model_api, "predict", "--sample", "20")
    assert result.returncode == 0, result.stderr
    assert "input: pixels FP32 [-1, 64]" in result.stdout
    correct = int(result.stdout.split("correct: ", 1)[1].split()[0])
    assert correct >= 18, result.stdout


def test_load_on_both_routes(model_api: str) -> None:
    for route in ("embeddings", "infer"):
        args = ["--api-url", model_api, "load", "--route", route, "--requests", "24", "--concurrency", "4"]
        result = client_app(*args, "--batch", "2", "--json", "--no-progress")
        assert result.returncode == 0, result.stderr
        report = json.loads(result.stdout)
        assert (report["sent"], report["ok"], report["planned_repeats"]) == (24, 24, 12)


def test_refusals_of_the_real_api_are_one_line(model_api: str) -> None:
    result = client_app("--api-url", model_api, "predict", "--model", "nope")
    assert result.returncode == 1
    assert result.stderr.startswith(f"client-app: GET {model_api}/v2/models/nope answered 404 Not Found: ")
    assert result.stderr.count("\n") == 1
    empty = client_app("--api-url", model_api, "embed", "")
    assert empty.returncode == 1
    assert empty.stderr.startswith(f"client-app: POST {model_api}/v1/embeddings answered 400 Bad Request: ")
