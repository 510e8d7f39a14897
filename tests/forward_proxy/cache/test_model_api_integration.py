"""The cache in front of the real model API (`model-api serve`, MiniLM), through `forward-proxy run`."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from tests.support.model_server import start_model_api
from tests.support.proxy import RunningProxy, start_proxy

pytestmark = [pytest.mark.integration, pytest.mark.slow]
MODEL = "all-MiniLM-L6-v2"


@pytest.fixture(scope="module")
def model_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    process, url = start_model_api(tmp_path_factory.mktemp("model-api"), "--device", "cpu")
    try:
        yield url
    finally:
        process.stop()


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningProxy]:
    with start_proxy(tmp_path_factory.mktemp("proxy")) as running:
        yield running


def post(proxy: RunningProxy, url: str, data: str) -> requests.Response:
    headers = {"Content-Type": "application/json"}
    answer = requests.post(url, data=data, headers=headers, proxies=proxy.proxies, timeout=120)
    assert answer.status_code == 200, answer.text
    return answer


def test_embeddings_are_computed_once_and_served_from_the_cache(model_api: str, proxy: RunningProxy) -> None:
    url = f"{model_api}/v1/embeddings"
    first = post(proxy, url, json.dumps({"input": ["a cached sentence"], "model": MODEL}))
    second = post(proxy, url, '{ "model" : "' + MODEL + '", "input" : [ "a cached sentence" ] }')
    assert (first.headers["X-Cache"], second.headers["X-Cache"]) == ("MISS", "HIT")
    assert second.content == first.content
    assert len(second.json()["data"][0]["embedding"]) == 384
    assert second.headers["X-Model-Version"] == first.headers["X-Model-Version"] != ""
    direct = requests.post(url, json={"input": ["a cached sentence"], "model": MODEL}, timeout=120)
    assert direct.json()["data"] == second.json()["data"]  # the cache answers what the model answers


def test_kserve_inference_is_cached(model_api: str, proxy: RunningProxy) -> None:
    url = f"{model_api}/v2/models/{MODEL}/infer"
    body = {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": ["kserve sentence"]}]}
    first = post(proxy, url, json.dumps(body))
    second = post(proxy, url, json.dumps(body, indent=2))
    assert (first.headers["X-Cache"], second.headers["X-Cache"]) == ("MISS", "HIT")
    assert second.content == first.content


def test_a_hit_is_much_faster_than_the_model(model_api: str, proxy: RunningProxy, tmp_path: Path) -> None:
    url = f"{model_api}/v1/embeddings"
    text = "timing sentence " * 20
    miss = post(proxy, url, json.dumps({"input": [text], "model": MODEL}))
    hits = [post(proxy, url, json.dumps({"input": [text], "model": MODEL})) for _ in range(5)]
    assert all(hit.headers["X-Cache"] == "HIT" for hit in hits)
    fastest_hit = min(hit.elapsed.total_seconds() for hit in hits)
    assert fastest_hit < miss.elapsed.total_seconds()
