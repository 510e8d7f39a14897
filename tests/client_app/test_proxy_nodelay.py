"""`client_app` turns Nagle's algorithm off on its connections to a proxy, which urllib3 leaves on
(urllib3 #2936): otherwise each POST waits for the proxy's delayed ACK of its head."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from client_app.client import ModelApiClient
from tests.client_app.conftest import PROXY_VARIABLES
from tests.client_app.fakes import FakeModelApi
from tests.support.proxy import start_proxy


def pooled_sockets(client: ModelApiClient, url: str) -> list[socket.socket]:
    """The sockets of the connections the client's session keeps open for `url` (urllib3's pools)."""
    adapter = client.session.get_adapter(url)
    managers = [adapter.poolmanager, *adapter.proxy_manager.values()]
    found = []
    for manager in managers:
        for key in manager.pools.keys():  # noqa: SIM118 (urllib3 refuses to iterate its pools)
            pool = manager.pools[key]
            found += [conn.sock for conn in list(pool.pool.queue) if conn is not None and conn.sock]
    return found


def nodelay(sock: socket.socket) -> int:
    return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)


@pytest.fixture(autouse=True)
def no_proxy_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)


@pytest.mark.integration
def test_connections_to_the_proxy_have_nagle_off(
    api: FakeModelApi, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with start_proxy(tmp_path) as proxy:  # a proxy that keeps the connection open
        monkeypatch.setenv("HTTP_PROXY", proxy.url)
        with ModelApiClient(api.url) as client:
            reply = client.embed(["a sentence"])
            assert reply.reply.proxy == proxy.url
            sockets = pooled_sockets(client, api.url)
            assert len(sockets) == 1 and nodelay(sockets[0]) == 1
