"""`client-app` through the real `forward-proxy run` (to the fake model API), as the demo wires them."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.client_app.conftest import clean_environment, client_app
from tests.client_app.fakes import FakeModelApi
from tests.support.processes import free_port
from tests.support.proxy import RunningProxy, start_proxy

pytestmark = pytest.mark.integration


@pytest.fixture
def forward_proxy(tmp_path: Path) -> Iterator[RunningProxy]:
    with start_proxy(tmp_path, "--access-log", str(tmp_path / "access.jsonl")) as proxy:
        yield proxy


def logged(tmp_path: Path) -> list[tuple[str, str]]:
    path = tmp_path / "access.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return [(entry["method"], entry["path"]) for entry in map(json.loads, lines)]


def test_every_command_goes_through_http_proxy_to_a_loopback_api(
    api: FakeModelApi, forward_proxy: RunningProxy, tmp_path: Path
) -> None:
    env = clean_environment(HTTP_PROXY=forward_proxy.url)
    search = client_app("--api-url", api.url, "search", "lost password", "--top", "1", env=env)
    assert search.returncode == 0, search.stderr
    assert f"via proxy {forward_proxy.url}" in search.stdout
    predict = client_app("--api-url", api.url, "predict", "--sample", "2", env=env)
    assert predict.returncode == 0, predict.stderr
    assert "correct: 2 of 2 built-in samples" in predict.stdout
    load = client_app(
        "--api-url", api.url, "load", "--requests", "6", "--repeat-ratio", "0", "--json", env=env
    )
    assert load.returncode == 0, load.stderr
    assert json.loads(load.stdout)["ok"] == 6
    expected = [("POST", "/v1/embeddings")] * 3 + [
        ("GET", "/v2/models/digits"),
        ("POST", "/v2/models/digits/infer"),
    ]
    assert logged(tmp_path) == expected + [("POST", "/v1/embeddings")] * 6


def test_a_repeated_request_shows_the_proxys_hit(api: FakeModelApi, forward_proxy: RunningProxy) -> None:
    env = clean_environment(HTTP_PROXY=forward_proxy.url)
    first = client_app("--api-url", api.url, "embed", "the same sentence", env=env)
    second = client_app("--api-url", api.url, "embed", "the same sentence", env=env)
    assert first.returncode == 0 and second.returncode == 0, first.stderr + second.stderr
    assert "X-Cache: MISS   X-Cache-Key: " in first.stdout.splitlines()[1]
    assert "X-Cache: HIT   X-Cache-Key: " in second.stdout.splitlines()[1]
    assert first.stdout.splitlines()[2:] == second.stdout.splitlines()[2:]


def test_model_api_down_behind_the_proxy_is_one_line(forward_proxy: RunningProxy) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    result = client_app("--api-url", url, "embed", "x", env=clean_environment(HTTP_PROXY=forward_proxy.url))
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert result.stderr.startswith(f"client-app: POST {url}/v1/embeddings answered 502")
    assert f"(through the proxy at {forward_proxy.url}): " in result.stderr
