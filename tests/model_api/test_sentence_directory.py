"""`--model NAME=DIRECTORY`: any sentence-transformers directory is served, not only the bundled alias.

The directory here is a copy of the bundled all-MiniLM-L6-v2, so its answers and its version must equal
the default model's, served beside it by the same server.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import requests

from model_api.models.registry import bundled_minilm_dir
from tests.model_api.conftest import Server, http
from tests.support.model_server import start_model_api

DEFAULT = "all-MiniLM-L6-v2"
COPY = "mini"
TEXTS = ["A dog runs in the park.", "Quarterly revenue grew by ten percent.", "hello"]

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def copied_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    copy = tmp_path_factory.mktemp("sentence-directory") / "minilm-copy"
    # The README does not change the answers, so it is not part of the version either.
    shutil.copytree(bundled_minilm_dir(), copy, ignore=shutil.ignore_patterns("README*"))
    return copy


@pytest.fixture(scope="module")
def both(copied_model: Path) -> Iterator[Server]:
    """One server with the bundled model and the copy under another name."""
    process, url = start_model_api(
        copied_model.parent, "--model", DEFAULT, "--model", f"{COPY}={copied_model}"
    )
    try:
        yield Server(process, url)
    finally:
        process.stop()


@pytest.fixture(scope="module")
def session() -> Iterator[requests.Session]:
    client = http()
    try:
        yield client
    finally:
        client.close()


def embed(session: requests.Session, server: Server, model: str) -> tuple[np.ndarray, requests.Response]:
    response = session.post(f"{server.url}/v1/embeddings", json={"input": TEXTS, "model": model}, timeout=60)
    assert response.status_code == 200, response.text
    assert response.json()["model"] == model
    vectors = np.asarray([item["embedding"] for item in response.json()["data"]], dtype=np.float32)
    return vectors, response


def test_the_copy_is_loaded_from_its_own_directory(both: Server, copied_model: Path) -> None:
    assert f"loaded model {COPY} (sentence_transformers) from {copied_model.resolve()}" in both.log()


def test_the_copy_embeds_exactly_as_the_bundled_model(session: requests.Session, both: Server) -> None:
    default, default_response = embed(session, both, DEFAULT)
    copy, copy_response = embed(session, both, COPY)
    assert copy.shape == (len(TEXTS), 384)
    assert np.allclose(copy, default, atol=1e-6)
    assert copy_response.headers["X-Input-Tokens"] == default_response.headers["X-Input-Tokens"]
    # One deployment version per server, on every response.
    assert copy_response.headers["X-Model-Version"] == default_response.headers["X-Model-Version"]


def test_the_copy_has_the_version_of_the_same_weights(session: requests.Session, both: Server) -> None:
    default = session.get(f"{both.url}/v2/models/{DEFAULT}", timeout=30).json()
    copy = session.get(f"{both.url}/v2/models/{COPY}", timeout=30).json()
    assert copy["platform"] == "sentence_transformers"
    # A model's version digests its weights and its other files by relative path, not where they lie.
    assert copy["versions"] == default["versions"]
    assert (copy["inputs"], copy["outputs"]) == (default["inputs"], default["outputs"])


def test_the_copy_embeds_through_kserve_too(session: requests.Session, both: Server) -> None:
    body = {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [len(TEXTS)], "data": TEXTS}]}
    response = session.post(f"{both.url}/v2/models/{COPY}/infer", json=body, timeout=60)
    assert response.status_code == 200, response.text
    output = response.json()["outputs"][0]
    assert output["name"] == "embedding" and output["shape"] == [len(TEXTS), 384]
    default, _ = embed(session, both, DEFAULT)
    assert np.allclose(np.asarray(output["data"]).reshape(len(TEXTS), 384), default, atol=1e-6)
