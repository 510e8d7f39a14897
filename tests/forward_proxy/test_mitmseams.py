"""The places where the proxy reaches into mitmproxy beyond its addon API (`forward_proxy/mitmseams.py`):
these fail loudly when a mitmproxy upgrade moves them. What they make possible is tested through a real
`forward-proxy run` in tests/reliability/test_upstream_faults.py (hung upstreams answered 504 at
`upstream_timeout`, stale entries standing in for an unreachable upstream)."""

from __future__ import annotations

import asyncio

from mitmproxy import http
from mitmproxy.addons.proxyserver import Proxyserver
from mitmproxy.proxy.layers.http import _http1
from mitmproxy.proxy.server import ConnectionHandler, ConnectionIO

from forward_proxy import mitmseams
from forward_proxy.protocolerrors import json_error_response


def test_mitmproxy_still_writes_its_error_pages_through_make_error_response() -> None:
    assert callable(_http1.make_error_response)


def test_the_connections_of_the_proxy_server_are_still_reachable() -> None:
    assert isinstance(Proxyserver().connections, dict)
    assert "transports" in ConnectionHandler.__annotations__
    assert "writer" in ConnectionIO.__dataclass_fields__


def test_an_answer_chosen_in_an_error_hook_replaces_the_error_page_once() -> None:
    async def error_hook_then_page() -> tuple[bytes, bytes]:
        mitmseams.answer_instead(http.Response.make(200, b"stale", {"x-cache": "STALE"}))
        return json_error_response(502, "Connection refused"), json_error_response(502, "Connection refused")

    chosen, next_page = asyncio.run(error_hook_then_page())
    assert chosen.startswith(b"HTTP/1.1 200 OK") and chosen.endswith(b"stale") and b"x-cache: STALE" in chosen
    assert next_page.startswith(b"HTTP/1.1 502") and b"upstream_failed" in next_page


def test_an_answer_chosen_in_one_task_never_reaches_another() -> None:
    async def main() -> bytes:
        async def hook() -> None:
            mitmseams.answer_instead(http.Response.make(200, b"mine"))

        await asyncio.create_task(hook())  # another task: its context is its own
        return json_error_response(502, "Connection refused")

    assert asyncio.run(main()).startswith(b"HTTP/1.1 502")


def test_the_hook_table_calls_what_mitmproxy_would_in_the_same_order_and_follows_changes() -> None:
    from mitmproxy import hooks
    from mitmproxy.test import taddons

    calls: list[str] = []

    class First:
        def running(self) -> None:
            calls.append("first")

    class Second:
        async def running(self) -> None:
            calls.append("second")

    class Halting:
        def running(self) -> None:
            from mitmproxy import exceptions

            calls.append("halting")
            raise exceptions.AddonHalt

    class Later:
        def running(self) -> None:
            calls.append("later")

    with taddons.context() as context:
        mitmseams.use_hook_table(context.master)
        assert isinstance(context.master.addons, mitmseams.HookTable)
        first, second = First(), Second()
        context.master.addons.add(first, second)
        asyncio.run(context.master.addons.trigger_event(hooks.RunningHook()))
        assert calls == ["first", "second"]
        context.master.addons.remove(first)  # the table follows the chain
        calls.clear()
        asyncio.run(context.master.addons.trigger_event(hooks.RunningHook()))
        assert calls == ["second"]
        context.master.addons.add(Halting(), Later())  # AddonHalt stops the event, as in mitmproxy
        calls.clear()
        asyncio.run(context.master.addons.trigger_event(hooks.RunningHook()))
        assert calls == ["second", "halting"]
