"""`/v1/embeddings` with the clients people use: LangChain's OpenAIEmbeddings and the openai SDK.

LangChain by default cuts texts into tiktoken (cl100k_base) token ids and sends the ids: the server must
refuse them with a 400 that says what to change, never embed them as its own ids. tiktoken fetches
cl100k_base from the internet on first use; here its cache is filled from the copy the `bpe-openai`
package ships (the same file, checked by tiktoken against its SHA-256), so the real default path runs
offline.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import importlib.util
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
import requests
from langchain_openai import OpenAIEmbeddings

from tests.model_api.conftest import Server
from tests.support.model_server import start_model_api

MODEL = "all-MiniLM-L6-v2"
CL100K_URL = "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken"
TEXTS = ["A dog runs in the park.", "Token ids of another tokenizer would embed as noise."]


@pytest.fixture(scope="module")
def tiktoken_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A tiktoken cache holding cl100k_base, as tiktoken names it (the SHA-1 of its URL)."""
    folder = tmp_path_factory.mktemp("tiktoken")
    package = importlib.util.find_spec("bpe_openai")  # found, not imported (it loads every encoding)
    assert package is not None and package.submodule_search_locations
    packed = Path(package.submodule_search_locations[0]) / "data" / "cl100k_base.tiktoken.gz"
    (folder / hashlib.sha1(CL100K_URL.encode()).hexdigest()).write_bytes(gzip.decompress(packed.read_bytes()))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TIKTOKEN_CACHE_DIR", str(folder))
        yield folder


@pytest.fixture
def http_client() -> Iterator[httpx.Client]:
    with httpx.Client(trust_env=False, timeout=60) as transport:
        yield transport


@pytest.fixture(scope="module")
def own_ids_server(work: Path) -> Iterator[Server]:
    """MiniLM alone, started with --accept-token-ids."""
    process, url = start_model_api(work, "--model", MODEL, "--accept-token-ids", "--max-inputs", "64")
    try:
        yield Server(process, url)
    finally:
        process.stop()


def served_vectors(client: requests.Session, url: str, inputs: object) -> np.ndarray:
    response = client.post(f"{url}/v1/embeddings", json={"input": inputs, "model": MODEL}, timeout=60)
    assert response.status_code == 200, response.text
    return np.asarray([item["embedding"] for item in response.json()["data"]], dtype=np.float32)


def rows_computed(client: requests.Session, server: Server) -> int:
    return int(client.get(f"{server.url}/stats").json()["models"][MODEL]["rows"])


def langchain(server: Server, transport: httpx.Client, **options: object) -> OpenAIEmbeddings:
    return OpenAIEmbeddings(
        model=MODEL,
        base_url=f"{server.url}/v1",
        api_key="not-needed",  # type: ignore[arg-type]
        http_client=transport,
        max_retries=0,
        **options,  # type: ignore[arg-type]
    )


def test_langchain_defaults_are_refused_and_the_ctx_check_off_gives_the_models_vectors(
    client: requests.Session, server: Server, http_client: httpx.Client, tiktoken_cache: Path
) -> None:
    """Its defaults send tiktoken ids (refused, nothing computed); with the ctx check off, the text."""
    before = rows_computed(client, server)
    with pytest.raises(openai.BadRequestError) as refused:
        langchain(server, http_client).embed_documents(TEXTS)
    assert refused.value.status_code == 400
    error = refused.value.body  # the SDK keeps the body's "error" object
    assert isinstance(error, dict) and error["code"] == "token_ids_not_accepted"
    assert "check_embedding_ctx_length=False" in error["message"]
    assert "--accept-token-ids" in error["message"]
    assert rows_computed(client, server) == before  # nothing reached the model
    embeddings = langchain(server, http_client, check_embedding_ctx_length=False)
    documents = np.asarray(embeddings.embed_documents(TEXTS), dtype=np.float32)
    query = np.asarray(embeddings.embed_query(TEXTS[0]), dtype=np.float32)
    expected = served_vectors(client, server.url, TEXTS)
    assert documents.shape == (2, 384)
    assert np.allclose(documents, expected, atol=1e-6)
    assert np.allclose(query, expected[0], atol=1e-6)


def test_the_openai_sdk_in_float_and_base64(
    client: requests.Session, server: Server, http_client: httpx.Client
) -> None:
    sdk = openai.OpenAI(
        base_url=f"{server.url}/v1", api_key="not-needed", http_client=http_client, max_retries=0
    )
    expected = served_vectors(client, server.url, TEXTS)
    as_floats = sdk.embeddings.create(model=MODEL, input=TEXTS, encoding_format="float")
    as_base64 = sdk.embeddings.create(model=MODEL, input=TEXTS, encoding_format="base64")
    assert np.array_equal(np.asarray([item.embedding for item in as_floats.data], dtype=np.float32), expected)
    raw = [np.frombuffer(base64.b64decode(item.embedding), dtype="<f4") for item in as_base64.data]  # type: ignore[arg-type]
    assert np.array_equal(np.stack(raw), expected)
    with pytest.raises(openai.BadRequestError, match="check_embedding_ctx_length=False"):
        sdk.embeddings.create(model=MODEL, input=[[15339, 1917]])


def test_with_accept_token_ids_the_models_own_ids_embed_like_their_text(
    client: requests.Session, own_ids_server: Server, http_client: httpx.Client
) -> None:
    from transformers import AutoTokenizer

    from model_api.models.registry import bundled_minilm_dir

    tokenizer = AutoTokenizer.from_pretrained(str(bundled_minilm_dir()), local_files_only=True)
    ids = [tokenizer(text)["input_ids"] for text in TEXTS]
    by_text = served_vectors(client, own_ids_server.url, TEXTS)
    assert np.allclose(served_vectors(client, own_ids_server.url, ids), by_text, atol=1e-6)
    assert np.allclose(served_vectors(client, own_ids_server.url, ids[0]), by_text[:1], atol=1e-6)
    sdk = openai.OpenAI(
        base_url=f"{own_ids_server.url}/v1", api_key="not-needed", http_client=http_client, max_retries=0
    )
    through_sdk = sdk.embeddings.create(model=MODEL, input=ids, encoding_format="float")
    assert np.allclose(np.asarray([item.embedding for item in through_sdk.data]), by_text, atol=1e-6)


@pytest.mark.parametrize(
    ("inputs", "status", "code"),
    [([101] * 257, 413, "input_too_long"), ([101, 99_999_999, 102], 400, "invalid_token")],
    ids=["longer than the model reads", "outside the vocabulary"],
)
def test_accepted_token_ids_are_still_checked(
    client: requests.Session, own_ids_server: Server, inputs: list[int], status: int, code: str
) -> None:
    response = client.post(f"{own_ids_server.url}/v1/embeddings", json={"input": inputs, "model": MODEL})
    assert response.status_code == status and response.json()["error"]["code"] == code
