"""Fixtures: the fake model API and proxy, and `client-app` run as a user runs it (a subprocess)."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Iterator

import pytest

from tests.client_app.fakes import FakeModelApi, FakeProxy, fake_api, fake_proxy
from tests.support.processes import console_script

PROXY_VARIABLES = (
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "ALL_PROXY",
    "NO_PROXY",
    "REQUESTS_CA_BUNDLE",
    "MODEL_API_URL",
)

RunClient = Callable[..., subprocess.CompletedProcess[str]]


def clean_environment(**extra: str) -> dict[str, str]:
    """The test process's environment without any proxy setting (in either case), plus `extra`."""
    env = {k: v for k, v in os.environ.items() if k.upper() not in PROXY_VARIABLES}
    env.update(extra)
    return env


def client_app(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [console_script("client-app"), *args],
        env=env if env is not None else clean_environment(),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@pytest.fixture
def api() -> Iterator[FakeModelApi]:
    with fake_api() as fake:
        yield fake


@pytest.fixture
def proxy() -> Iterator[FakeProxy]:
    with fake_proxy() as fake:
        yield fake
