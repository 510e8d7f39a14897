"""`forward_proxy.sockets`: TCP_NODELAY and quick ACKs on the proxy's connections (no delayed-ACK stall).

The integration tests fail when a mitmproxy upgrade bypasses the mechanism: a probe addon inside a real
`forward-proxy run` reads the socket options of the live client and server connections during a
request, and a `requests` Session (Nagle on, as urllib3 leaves it for proxies) must see hits in
milliseconds, not the 40 ms of a delayed ACK.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from mitmproxy.test import taddons, tflow

from forward_proxy import sockets
from tests.support.proxy import start_proxy
from tests.support.upstream import Reply, Upstream

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="TCP_QUICKACK is Linux only")

PROBE = """
import json, socket
from forward_proxy import sockets

def state(client, conn):
    writer = sockets.stream_writer(client, conn)
    sock = writer.get_extra_info("socket")
    return {
        "nodelay": sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY),
        "protocol": type(writer.transport.get_protocol()).__name__,
    }

class Probe:
    def response(self, flow):
        report = {"client": state(flow.client_conn, flow.client_conn)}
        if flow.server_conn.connected:
            report["server"] = state(flow.client_conn, flow.server_conn)
        flow.response.headers["X-Socket-Probe"] = json.dumps(report)

addons = [Probe()]
"""


async def loopback_pair() -> tuple[asyncio.StreamWriter, asyncio.StreamReader, socket.socket, asyncio.Server]:
    """An asyncio server connection (its writer and reader) and the plain client socket talking to it."""
    accepted: asyncio.Future[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = asyncio.Future()

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.set_result((reader, writer))

    server = await asyncio.start_server(on_connect, "127.0.0.1", 0)
    client = socket.create_connection(server.sockets[0].getsockname()[:2])
    reader, writer = await accepted
    return writer, reader, client, server


@linux_only
def test_tune_sets_nodelay_and_rearms_quickack_on_every_read() -> None:
    async def scenario() -> None:
        writer, reader, client, server = await loopback_pair()
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 0)
        assert sockets.tune(writer) and sockets.tune(writer)  # idempotent
        protocol = writer.transport.get_protocol()
        assert isinstance(protocol, sockets.QuickAckProtocol)
        assert not isinstance(protocol.inner, sockets.QuickAckProtocol)
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
        for chunk in (b"first", b"second"):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 0)
            client.sendall(chunk)
            assert await reader.read(100) == chunk  # reads still reach mitmproxy's reader ...
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK) == 1  # ... after re-arming
        writer.write(b"answer")
        await writer.drain()
        assert client.recv(100) == b"answer"
        client.close()
        assert await reader.read(100) == b""  # EOF passes through too
        writer.close()
        server.close()

    asyncio.run(scenario())


def test_without_quickack_only_nodelay_is_set(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sockets, "TCP_QUICKACK", None)  # as on macOS and Windows

    async def scenario() -> None:
        writer, _reader, client, server = await loopback_pair()
        assert sockets.tune(writer)
        assert not isinstance(writer.transport.get_protocol(), sockets.QuickAckProtocol)
        assert writer.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
        client.close()
        writer.close()
        server.close()

    asyncio.run(scenario())


def test_without_a_proxyserver_the_addon_does_nothing(caplog: pytest.LogCaptureFixture) -> None:
    addon = sockets.Sockets()
    with taddons.context(addon):
        flow = tflow.tflow()
        addon.client_connected(flow.client_conn)
    assert not addon.warned and "sockets:" not in caplog.text


def test_a_moved_connection_handler_is_one_warning(caplog: pytest.LogCaptureFixture) -> None:
    addon = sockets.Sockets()
    moved = SimpleNamespace(name="proxyserver")  # a proxyserver without `connections`
    with taddons.context(addon) as context, caplog.at_level(logging.WARNING):
        context.master.addons.add(moved)
        flow = tflow.tflow()
        addon.client_connected(flow.client_conn)
        addon.client_connected(flow.client_conn)
    assert addon.warned
    assert caplog.text.count("sockets: cannot reach a connection's socket") == 1


@pytest.mark.integration
@linux_only
def test_live_connections_are_tuned_during_a_request(tmp_path: Path) -> None:
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)
    with Upstream() as upstream, start_proxy(tmp_path, "--set", f"scripts={probe}") as proxy:
        answer = proxy.session().get(upstream.url("/anything"), timeout=10)
        assert answer.status_code == 200, proxy.log()
        report = json.loads(answer.headers["X-Socket-Probe"])
    for side in ("client", "server"):
        assert report[side] == {"nodelay": 1, "protocol": "QuickAckProtocol"}, report


@pytest.mark.integration
def test_a_requests_session_gets_hits_without_the_delayed_ack_stall(tmp_path: Path) -> None:
    """requests leaves Nagle on for proxies: its POST body waits for the ACK of the head. Without quick
    ACKs each hit takes about 40 ms; the bound is loose for a busy machine (the benchmark has the
    figures)."""
    with Upstream() as upstream, start_proxy(tmp_path) as proxy:
        upstream.reply("/v1/embeddings", Reply(body=b'{"data": [{"embedding": [0.25, 0.5]}]}'))
        session = proxy.session()
        url = upstream.url("/v1/embeddings")
        body = {"input": "a sentence", "model": "all-MiniLM-L6-v2"}
        assert session.post(url, json=body, timeout=10).headers["X-Cache"] == "MISS"
        durations = []
        for _ in range(30):
            started = time.perf_counter()
            answer = session.post(url, json=body, timeout=10)
            durations.append(time.perf_counter() - started)
            assert answer.headers["X-Cache"] == "HIT"
        assert upstream.calls("/v1/embeddings") == 1
    assert statistics.median(durations) < 0.010, sorted(durations)
