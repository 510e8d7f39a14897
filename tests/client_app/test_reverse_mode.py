"""A client without proxy support uses `forward-proxy run` in mitmproxy's reverse mode (docs/clients.md):
it talks to the proxy as if it were the model API, and repeated requests are cache hits."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.client_app.conftest import clean_environment, client_app
from tests.client_app.fakes import FakeModelApi
from tests.support.proxy import start_proxy

pytestmark = pytest.mark.integration


def test_client_app_through_a_reverse_proxy_gets_hits(api: FakeModelApi, tmp_path: Path) -> None:
    with start_proxy(tmp_path, "--set", f"mode=reverse:{api.url}") as proxy:
        runs = [
            client_app("--api-url", proxy.url, "embed", "a sentence", env=clean_environment()) for _ in "ab"
        ]
    for run in runs:
        assert run.returncode == 0, run.stderr
        assert "direct (no proxy for this URL)" in run.stdout.splitlines()[0]
    assert "X-Cache: MISS" in runs[0].stdout and "X-Cache: HIT" in runs[1].stdout
    assert [request.method for request in api.requests if request.path != "/v2/health/live"] == ["POST"]
