"""The connection limit driven through mitmproxy's test context: no sockets."""

from __future__ import annotations

import logging

import pytest
from mitmproxy import connection, exceptions
from mitmproxy.test import taddons, tflow

from forward_proxy.policy.connections import DEFAULT_MAX_CLIENT_CONNECTIONS, ConnectionLimit

LOG = "forward_proxy.policy.connections"


def client() -> connection.Client:
    return tflow.tclient_conn()


def test_connections_beyond_the_limit_are_refused_and_admitted_again_once_others_close() -> None:
    limit = ConnectionLimit()
    with taddons.context(limit) as tctx:
        tctx.configure(limit, max_client_connections=2)
        first, second, third = client(), client(), client()
        for each in (first, second, third):
            limit.client_connected(each)
        assert not first.error and not second.error
        assert third.error == "refused: max_client_connections reached"
        assert limit.refused == 1
        limit.client_disconnected(third)  # a refused connection closes too: it held no place
        limit.client_disconnected(first)
        fourth = client()
        limit.client_connected(fourth)
        assert not fourth.error and limit.open == {second.id, fourth.id}


def test_zero_turns_the_limit_off_and_the_default_is_finite() -> None:
    limit = ConnectionLimit()
    with taddons.context(limit) as tctx:
        assert limit.limit == DEFAULT_MAX_CLIENT_CONNECTIONS > 0
        tctx.configure(limit, max_client_connections=0)
        clients = [client() for _ in range(50)]
        for each in clients:
            limit.client_connected(each)
        assert not any(each.error for each in clients) and limit.refused == 0


def test_a_client_already_refused_by_allow_clients_takes_no_place() -> None:
    limit = ConnectionLimit()
    with taddons.context(limit) as tctx:
        tctx.configure(limit, max_client_connections=1)
        outsider = client()
        outsider.error = "refused: client address not in allow_clients"
        limit.client_connected(outsider)
        insider = client()
        limit.client_connected(insider)
        assert not insider.error and limit.refused == 0


def test_a_negative_limit_is_refused_with_a_sentence() -> None:
    limit = ConnectionLimit()
    with taddons.context(limit) as tctx, pytest.raises(exceptions.OptionsError, match="0 for no limit"):
        tctx.configure(limit, max_client_connections=-1)


def test_a_flood_is_logged_once_with_its_count(caplog: pytest.LogCaptureFixture) -> None:
    limit = ConnectionLimit()
    with taddons.context(limit) as tctx, caplog.at_level(logging.WARNING, logger=LOG):
        tctx.configure(limit, max_client_connections=1)
        limit.client_connected(client())
        for _ in range(20):
            limit.client_connected(client())
    lines = [record.getMessage() for record in caplog.records if record.name == LOG]
    assert len(lines) == 1, lines
    assert "rule=max_client_connections" in lines[0] and "limit=1" in lines[0]
    assert limit.refused == 20
