"""mitmproxy's own error answers come in the project's JSON error shape."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mitmproxy.proxy.layers.http import _http1
from mitmproxy.test import taddons

from forward_proxy.protocolerrors import ProtocolErrors, json_error_response
from tests.support.processes import free_port
from tests.support.proxy import start_proxy


def split(answer: bytes) -> tuple[bytes, dict[str, str], dict[str, object]]:
    head, _, body = answer.partition(b"\r\n\r\n")
    status_line, *lines = head.decode().split("\r\n")
    headers = {name.lower(): value.strip() for name, _, value in (line.partition(":") for line in lines)}
    return status_line.encode(), headers, json.loads(body)


@pytest.mark.parametrize(
    ("status", "message", "code"),
    [
        (400, "Bad HTTP request line: b'HELLO'", "bad_request"),
        (413, "Request body exceeds mitmproxy's body_size_limit.", "request_too_large"),
        (502, "Connection refused", "upstream_failed"),
        (504, "", "upstream_timeout"),
        (599, "odd", "proxy_error"),
    ],
)
def test_errors_are_json_with_a_fitting_code(status: int, message: str, code: str) -> None:
    status_line, headers, body = split(json_error_response(status, message))
    assert status_line.startswith(f"HTTP/1.1 {status}".encode())
    assert headers["content-type"] == "application/json" and headers["connection"] == "close"
    assert int(headers["content-length"]) == len(json.dumps(body).encode())
    error = body["error"]
    assert isinstance(error, dict) and error["code"] == code and error["status"] == status
    assert message in str(error["message"]) and str(error["message"]).endswith(".")


def test_loading_swaps_the_error_pages_and_done_puts_them_back() -> None:
    original = _http1.make_error_response
    addon = ProtocolErrors()
    with taddons.context(addon):
        assert _http1.make_error_response is json_error_response
        addon.done()
    assert _http1.make_error_response is original
    assert b"text/html" in original(400, "x")


@pytest.mark.integration
def test_an_unreachable_upstream_of_an_uncached_route_is_a_json_502(tmp_path: Path) -> None:
    closed_port = free_port()  # nothing listens there
    with start_proxy(tmp_path) as proxy, proxy.session() as session:
        answer = session.get(f"http://127.0.0.1:{closed_port}/some/page", timeout=30)
        assert answer.status_code == 502
        assert answer.headers["Content-Type"] == "application/json"
        error = answer.json()["error"]
        assert error["code"] == "upstream_failed" and error["status"] == 502
        assert error["message"].startswith("The proxy got no answer from the upstream: ")
        assert "connect call failed" in error["message"].lower()
