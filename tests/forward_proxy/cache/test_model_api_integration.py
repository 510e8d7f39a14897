"""The cache in front of the real model API (`model-api serve`, MiniLM), through `forward-proxy run`."""

from __future__ import annotations

import http.client
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from forward_proxy.privacy.pseudonym import KEY_FILE_NAME, Pseudonyms, load_or_create_key
from tests.support.model_server import start_model_api
from tests.support.processes import ManagedProcess
from tests.support.proxy import RunningProxy, start_proxy

pytestmark = [pytest.mark.integration, pytest.mark.slow]
MODEL = "all-MiniLM-L6-v2"
OTHER = ("127.0.0.2", 0)  # a second client address on loopback


@pytest.fixture(scope="module")
def model_api_process(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ManagedProcess, str]]:
    process, url = start_model_api(tmp_path_factory.mktemp("model-api"), "--device", "cpu")
    try:
        yield process, url
    finally:
        process.stop()


@pytest.fixture(scope="module")
def model_api(model_api_process: tuple[ManagedProcess, str]) -> str:
    return model_api_process[1]


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


def request_lines(log: str) -> list[dict[str, Any]]:
    """The model API's request log: one JSON object per line."""
    return [json.loads(line) for line in log.splitlines() if line.startswith('{"time"')]


def test_the_model_api_logs_the_proxys_pseudonym_and_no_address(
    model_api_process: tuple[ManagedProcess, str], proxy: RunningProxy
) -> None:
    process, url = model_api_process
    pseudonyms = Pseudonyms(load_or_create_key(proxy.cache_dir / KEY_FILE_NAME))
    expected = pseudonyms.of("127.0.0.1")
    already = len(request_lines(process.log()))
    ready = requests.get(f"{url}/v2/models/{MODEL}/ready", proxies=proxy.proxies, timeout=120)
    assert ready.status_code == 200  # a route no cache rule matches: mitmproxy forwards it
    other_client = http.client.HTTPConnection(proxy.host, proxy.port, timeout=120, source_address=OTHER)
    try:
        other_client.request("GET", f"{url}/v2/models/{MODEL}")  # absolute form: through the proxy
        assert other_client.getresponse().status == 200
    finally:
        other_client.close()
    miss = post(proxy, f"{url}/v1/embeddings", json.dumps({"input": ["a logged client"], "model": MODEL}))
    assert miss.headers["X-Cache"] == "MISS"  # a cached route: the cache's own client forwards it
    deadline = time.monotonic() + 10
    lines = request_lines(process.log())[already:]
    while len(lines) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
        lines = request_lines(process.log())[already:]
    ready_line = next(line for line in lines if line["path"] == f"/v2/models/{MODEL}/ready")
    embedding_line = next(line for line in lines if line["path"] == "/v1/embeddings")
    other_line = next(line for line in lines if line["path"] == f"/v2/models/{MODEL}")
    assert ready_line["client"] == embedding_line["client"] == expected
    assert other_line["client"] == pseudonyms.of(OTHER[0]) != expected  # another address, another id
    # The proxy's address (127.0.0.1, the model API's client) is nowhere after the startup banner.
    assert "127.0.0.1" not in json.dumps(lines)
    assert "127.0.0.1:" not in process.log().split("(Press CTRL+C to quit)", 1)[-1]
