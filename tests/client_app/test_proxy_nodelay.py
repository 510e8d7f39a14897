"""`client_app` turns Nagle's algorithm off on its connections to a proxy, which urllib3 leaves on
(urllib3 #2936): otherwise each POST waits for the proxy's delayed ACK of its head."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import pytest
import requests

from client_app.client import ModelApiClient
from tests.client_app.conftest import PROXY_VARIABLES
from tests.support.proxy import start_proxy
from tests.support.upstream import Reply, Upstream

EMBEDDINGS = b'{"object": "list", "data": [{"object": "embedding", "embedding": [0.25, 0.5], "index": 0}]}'


@pytest.fixture(autouse=True)
def no_proxy_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)


@pytest.mark.integration
def test_connections_to_the_proxy_have_nagle_off(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[int] = []

    def record(response: requests.Response, **kwargs: Any) -> None:
        # The answer's body is not read yet, so its connection is still the response's own.
        sock = response.raw.connection.sock
        seen.append(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))

    with Upstream() as api, start_proxy(tmp_path) as proxy:  # both keep connections open (HTTP/1.1)
        api.reply("/v1/embeddings", Reply(body=EMBEDDINGS))
        monkeypatch.setenv("HTTP_PROXY", proxy.url)
        with ModelApiClient(api.origin) as client:
            client.session.hooks["response"].append(record)
            reply = client.embed(["a sentence"])
    assert reply.reply.proxy == proxy.url
    assert seen == [1]
