"""`client_app.client`: which proxy requests picks, and the one-line messages for failures."""

from __future__ import annotations

import json
from http import HTTPStatus

import pytest
import requests

from client_app.client import (
    ClientError,
    InputError,
    ModelApiClient,
    Reply,
    error_message,
    normalise_api_url,
    parse_embeddings,
    parse_metadata,
)
from tests.client_app.conftest import PROXY_VARIABLES


@pytest.fixture(autouse=True)
def no_proxy_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)


# requests' own rules, the ones docs/client.md states: loopback is proxied unless NO_PROXY names it.
@pytest.mark.parametrize(
    ("environment", "url", "proxy"),
    [
        ({}, "http://127.0.0.1:8000/v1/embeddings", None),
        ({"HTTP_PROXY": "http://127.0.0.1:8080"}, "http://127.0.0.1:8000/x", "http://127.0.0.1:8080"),
        ({"HTTP_PROXY": "http://127.0.0.1:8080"}, "http://localhost:8000/x", "http://127.0.0.1:8080"),
        ({"http_proxy": "http://127.0.0.1:8080"}, "http://127.0.0.2:8000/x", "http://127.0.0.1:8080"),
        ({"HTTP_PROXY": "http://127.0.0.1:8080"}, "https://example.com/", None),
        ({"HTTPS_PROXY": "http://127.0.0.1:8080"}, "https://example.com/", "http://127.0.0.1:8080"),
        ({"ALL_PROXY": "http://127.0.0.1:8080"}, "http://127.0.0.1:8000/x", "http://127.0.0.1:8080"),
        ({"HTTP_PROXY": "http://p:1", "NO_PROXY": "127.0.0.1"}, "http://127.0.0.1:8000/x", None),
        ({"HTTP_PROXY": "http://p:1", "NO_PROXY": "127.0.0.1"}, "http://127.0.0.2:8000/x", "http://p:1"),
        ({"HTTP_PROXY": "http://p:1", "NO_PROXY": "127.0.0.0/8"}, "http://127.0.0.2:8000/x", None),
        ({"HTTP_PROXY": "http://p:1", "NO_PROXY": "localhost"}, "http://127.0.0.1:8000/x", "http://p:1"),
        ({"HTTP_PROXY": "http://p:1", "NO_PROXY": "localhost"}, "http://localhost:8000/x", None),
        ({"HTTP_PROXY": "http://p:1", "NO_PROXY": "*"}, "http://example.com/", None),
        ({"HTTP_PROXY": "http://p:1", "NO_PROXY": ".example.com"}, "http://api.example.com/", None),
    ],
)
def test_proxy_for(
    monkeypatch: pytest.MonkeyPatch, environment: dict[str, str], url: str, proxy: str | None
) -> None:
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    assert ModelApiClient("http://127.0.0.1:8000").proxy_for(url) == proxy


def test_api_url_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    assert ModelApiClient().api_url == "http://127.0.0.1:8000"
    monkeypatch.setenv("MODEL_API_URL", "http://127.0.0.3:9000/")
    assert ModelApiClient().api_url == "http://127.0.0.3:9000"
    assert ModelApiClient("http://127.0.0.2:1").api_url == "http://127.0.0.2:1"
    for bad in ("127.0.0.1:8000", "ftp://x", "http://"):
        with pytest.raises(InputError):
            normalise_api_url(bad)


def response(status: int, body: object) -> requests.Response:
    answer = requests.Response()
    answer.status_code = status
    answer.reason = HTTPStatus(status).phrase
    answer._content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return answer


MITMPROXY_502 = b"""<html>
<head>
    <title>502 Bad Gateway</title>
</head>
<body>
    <h1>502 Bad Gateway</h1>
    <p>[Errno 111] Connect call failed (&#x27;127.0.0.1&#x27;, 9)</p>
</body>
</html>"""


@pytest.mark.parametrize(
    ("status", "body", "message"),
    [
        (
            502,
            {"error": {"code": "upstream_unreachable", "message": "no route"}},
            "upstream_unreachable: no route",
        ),
        (400, {"error": {"message": "bad input"}}, "bad input"),
        (413, {"error": {"code": 413, "message": "too long"}}, "413: too long"),
        (403, {"error": "egress denied"}, "egress denied"),
        (404, {"detail": "Not Found"}, "Not Found"),
        (
            422,
            {"detail": [{"loc": ["body", "input"], "msg": "Field required"}]},
            "body.input: Field required",
        ),
        (500, b"<h1>Internal\n  Server Error</h1>", "Internal Server Error"),
        (500, b"oops <b>bold</b> text", "oops <b>bold</b> text"),
        (502, b"", "(empty body)"),
        (500, b"x" * 300, "x" * 200 + "…"),
        (502, MITMPROXY_502, "[Errno 111] Connect call failed ('127.0.0.1', 9)"),
    ],
)
def test_error_message(status: int, body: object, message: str) -> None:
    assert error_message(response(status, body)) == message


def reply(body: object) -> Reply:
    return Reply("POST", "http://t/v1/embeddings", 200, {}, body, 0.0, None)


def test_embeddings_are_put_in_index_order() -> None:
    body = {"data": [{"index": 1, "embedding": [2.0]}, {"index": 0, "embedding": [1, 0.5]}]}
    assert parse_embeddings(reply(body), 2) == [[1.0, 0.5], [2.0]]


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"data": [{"index": 0, "embedding": [1.0]}]},
        {"data": [{"index": 0, "embedding": [1.0]}, {"index": 0, "embedding": [1.0]}]},
        {"data": [{"index": 0, "embedding": "AAAA"}, {"index": 1, "embedding": [1.0]}]},
        {"data": [{"index": 5, "embedding": [1.0]}, {"index": 1, "embedding": [1.0]}]},
    ],
)
def test_malformed_embeddings_are_refused(body: object) -> None:
    with pytest.raises(ClientError, match="unexpected answer"):
        parse_embeddings(reply(body), 2)


def test_metadata() -> None:
    body = {
        "name": "digits",
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 64]}],
        "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 10]}],
    }
    metadata = parse_metadata(reply(body), "digits")
    assert (metadata.inputs[0].name, metadata.inputs[0].shape, metadata.outputs[0].name) == (
        "x",
        [-1, 64],
        "y",
    )
    with pytest.raises(ClientError, match="declares no inputs"):
        parse_metadata(reply({"name": "minilm", "inputs": []}), "minilm")
    with pytest.raises(ClientError, match="needs name, datatype and shape"):
        parse_metadata(reply({"inputs": [{"name": "x"}]}), "m")
