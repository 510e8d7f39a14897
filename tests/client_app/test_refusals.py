"""`client-app` through a real `forward-proxy run` that refuses: the egress policy (403) and proxy
authentication (407) each end in one clear line on stderr, no traceback, a non-zero exit."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.client_app.conftest import clean_environment, client_app
from tests.client_app.fakes import FakeModelApi
from tests.client_app.test_cli_errors import one_line_error
from tests.support.proxy import RunningProxy, start_proxy

pytestmark = pytest.mark.integration


@pytest.fixture
def guarded_proxy(tmp_path: Path) -> Iterator[RunningProxy]:
    """A proxy that wants `user:pass` (the egress policy is on in every proxy)."""
    with start_proxy(tmp_path, "--proxyauth", "user:pass") as proxy:
        yield proxy


def with_credentials(proxy: RunningProxy, userinfo: str) -> str:
    return proxy.url.replace("http://", f"http://{userinfo}@", 1)


def test_a_destination_the_egress_policy_denies(guarded_proxy: RunningProxy) -> None:
    metadata = "http://169.254.169.254/latest/meta-data/"
    env = clean_environment(HTTP_PROXY=with_credentials(guarded_proxy, "user:pass"))
    result = client_app("fetch", metadata, env=env)
    message = one_line_error(result)
    assert message.startswith(f"{metadata} answered 403")
    assert "egress_denied: The proxy does not connect to 169.254.169.254" in message
    assert "egress_allow" in message  # what to ask for
    assert ":pass@" not in result.stderr  # the proxy's password is not repeated


def test_a_proxy_that_wants_credentials(guarded_proxy: RunningProxy, api: FakeModelApi) -> None:
    env = clean_environment(HTTP_PROXY=guarded_proxy.url)
    message = one_line_error(client_app("--api-url", api.url, "embed", "hello", env=env))
    assert message.startswith(f"POST {api.url}/v1/embeddings answered 407")
    assert f"through the proxy at {guarded_proxy.url}" in message
    assert "proxy_auth_required: This proxy needs credentials" in message
    assert "HTTP_PROXY=http://USER:PASSWORD@" in message  # how a client-app user sends them


def test_wrong_proxy_credentials_are_not_echoed(guarded_proxy: RunningProxy, api: FakeModelApi) -> None:
    env = clean_environment(HTTP_PROXY=with_credentials(guarded_proxy, "user:s3cret-guess"))
    result = client_app("--api-url", api.url, "embed", "hello", env=env)
    message = one_line_error(result)
    assert "answered 407" in message
    assert "s3cret-guess" not in result.stderr + result.stdout


def test_the_right_credentials_pass(guarded_proxy: RunningProxy, api: FakeModelApi) -> None:
    env = clean_environment(HTTP_PROXY=with_credentials(guarded_proxy, "user:pass"))
    result = client_app("--api-url", api.url, "embed", "hello", env=env)
    assert result.returncode == 0, result.stderr
    assert ":pass@" not in result.stdout + result.stderr
