"""`POST /v1/embeddings` on the real server: MiniLM's vectors, and the official openai SDK against it."""

from __future__ import annotations

import base64

import httpx
import numpy as np
import pytest
import requests
from openai import OpenAI

from tests.model_api.conftest import Server

MODEL = "all-MiniLM-L6-v2"


def embed(client: requests.Session, server: Server, inputs: object, **extra: object) -> list[np.ndarray]:
    response = client.post(
        f"{server.url}/v1/embeddings", json={"input": inputs, "model": MODEL, **extra}, timeout=60
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "list" and body["model"] == MODEL
    assert [item["index"] for item in body["data"]] == list(range(len(body["data"])))
    assert all(item["object"] == "embedding" for item in body["data"])
    return [np.asarray(item["embedding"], dtype=np.float32) for item in body["data"]]


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_embeddings_have_384_unit_length_dimensions(client: requests.Session, server: Server) -> None:
    vectors = embed(client, server, ["A dog runs in the park.", "Quarterly revenue grew by ten percent."])
    assert [vector.shape for vector in vectors] == [(384,), (384,)]
    assert np.allclose([np.linalg.norm(vector) for vector in vectors], 1.0, atol=1e-5)
    assert not np.allclose(vectors[0], vectors[1])


def test_identical_text_gives_identical_embeddings(client: requests.Session, server: Server) -> None:
    text = "The quick brown fox jumps over the lazy dog."
    first = embed(client, server, text)[0]
    again = embed(client, server, text)[0]
    assert np.array_equal(first, again)


def test_a_paraphrase_is_closer_than_an_unrelated_sentence(client: requests.Session, server: Server) -> None:
    anchor, paraphrase, unrelated = embed(
        client,
        server,
        [
            "How do I reset my password?",
            "What are the steps to change my login password?",
            "The volcano erupted, covering the village in ash.",
        ],
    )
    assert cosine(anchor, paraphrase) > cosine(anchor, unrelated) + 0.3


@pytest.mark.slow
def test_vectors_agree_with_sentence_transformers_encode(client: requests.Session, server: Server) -> None:
    from sentence_transformers import SentenceTransformer

    from model_api.models.registry import bundled_minilm_dir

    texts = ["hello world", "A man is eating food.", "Une phrase en français.", "x", "word " * 400]
    reference = SentenceTransformer(str(bundled_minilm_dir()), device="cpu", local_files_only=True).encode(
        texts
    )
    served = np.stack(embed(client, server, texts))
    assert served.shape == reference.shape
    assert np.allclose(served, reference, atol=1e-5)


def test_usage_counts_the_tokens_the_model_read(client: requests.Session, server: Server) -> None:
    response = client.post(
        f"{server.url}/v1/embeddings", json={"input": ["hello world", "hi"], "model": MODEL}
    )
    # [CLS] hello world [SEP] and [CLS] hi [SEP]
    assert response.json()["usage"] == {"prompt_tokens": 7, "total_tokens": 7}


def test_dimensions_keeps_the_leading_components_at_unit_length(
    client: requests.Session, server: Server
) -> None:
    full = embed(client, server, "Matryoshka embeddings")[0]
    short = embed(client, server, "Matryoshka embeddings", dimensions=64)[0]
    assert short.shape == (64,)
    assert np.isclose(np.linalg.norm(short), 1.0, atol=1e-5)
    assert np.allclose(short, full[:64] / np.linalg.norm(full[:64]), atol=1e-6)


def test_base64_is_the_float32_bytes_of_the_float_answer(client: requests.Session, server: Server) -> None:
    floats = embed(client, server, ["one", "two"])
    response = client.post(
        f"{server.url}/v1/embeddings",
        json={"input": ["one", "two"], "model": MODEL, "encoding_format": "base64"},
    )
    decoded = [
        np.frombuffer(base64.b64decode(item["embedding"]), dtype="<f4") for item in response.json()["data"]
    ]
    assert np.array_equal(np.stack(decoded), np.stack(floats))


def test_the_official_openai_sdk_round_trip(client: requests.Session, server: Server) -> None:
    texts = ["The SDK talks to this server.", "It decodes base64 by default."]
    expected = np.stack(embed(client, server, texts))
    with httpx.Client(trust_env=False, timeout=60) as transport:
        sdk = OpenAI(base_url=f"{server.url}/v1", api_key="not-needed", http_client=transport, max_retries=0)
        default = sdk.embeddings.create(model=MODEL, input=texts)  # the SDK asks for base64 and decodes it
        as_floats = sdk.embeddings.create(model=MODEL, input=texts, encoding_format="float")
        as_base64 = sdk.embeddings.create(model=MODEL, input=texts, encoding_format="base64")
        listed = [model.id for model in sdk.models.list()]
    assert np.allclose(np.asarray([item.embedding for item in default.data]), expected, atol=1e-7)
    assert np.allclose(np.asarray([item.embedding for item in as_floats.data]), expected, atol=1e-7)
    raw = [np.frombuffer(base64.b64decode(item.embedding), dtype="<f4") for item in as_base64.data]  # type: ignore[arg-type]
    assert np.array_equal(np.stack(raw), expected)
    assert default.model == MODEL and default.usage.prompt_tokens > 0
    assert MODEL in listed and "digits" in listed


def test_the_model_may_be_left_out(client: requests.Session, server: Server) -> None:
    response = client.post(f"{server.url}/v1/embeddings", json={"input": "no model named"})
    assert response.status_code == 200
    assert response.json()["model"] == MODEL
