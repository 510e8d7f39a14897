"""When the proxy or the model API is down, slow or refuses, `client-app` says so in one line, no traceback."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from tests.client_app.conftest import clean_environment, client_app
from tests.client_app.fakes import FakeModelApi, FakeProxy
from tests.support.processes import free_port


def one_line_error(result: subprocess.CompletedProcess[str], code: int = 1) -> str:
    assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("client-app: "), result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    return lines[0].removeprefix("client-app: ")


def test_model_api_down() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    message = one_line_error(client_app("--api-url", url, "embed", "x"))
    assert message == f"the model API at {url} refused the connection — is model-api serve running?"


def test_proxy_down() -> None:
    proxy = f"http://127.0.0.1:{free_port()}"
    env = clean_environment(HTTP_PROXY=proxy)
    for args in (["search", "q"], ["predict"], ["fetch", "http://127.0.0.1:9/"], ["embed", "x"]):
        message = one_line_error(client_app(*args, env=env))
        assert message == f"the proxy at {proxy} refused the connection — is forward-proxy running?"


def test_proxy_up_but_model_api_down(proxy: FakeProxy) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    message = one_line_error(
        client_app("--api-url", url, "embed", "x", env=clean_environment(HTTP_PROXY=proxy.url))
    )
    assert message == (
        f"POST {url}/v1/embeddings answered 502 Bad Gateway (through the proxy at {proxy.url}): "
        "upstream_unreachable: the origin refused the connection"
    )


def test_error_bodies_of_the_model_api(api: FakeModelApi) -> None:
    api.failures["/v1/embeddings"] = (
        503,
        {"error": {"code": "overloaded", "message": "queue full,\nretry later"}},
    )
    message = one_line_error(client_app("--api-url", api.url, "embed", "x"))
    assert (
        message
        == f"POST {api.url}/v1/embeddings answered 503 Service Unavailable: overloaded: queue full, retry later"
    )
    validation = {"detail": [{"loc": ["body", "input"], "msg": "Field required", "type": "missing"}]}
    api.failures["/v1/embeddings"] = (422, validation)
    message = one_line_error(client_app("--api-url", api.url, "search", "q"))
    assert message.endswith("answered 422 Unprocessable Entity: body.input: Field required")
    message = one_line_error(client_app("--api-url", api.url, "predict", "--model", "no/pe"))
    assert message == (
        f"GET {api.url}/v2/models/no%2Fpe answered 404 Not Found: not_found: no route GET /v2/models/no%2Fpe"
    )


def test_timeout(api: FakeModelApi) -> None:
    api.delay = 3.0
    message = one_line_error(client_app("--api-url", api.url, "--timeout", "0.5", "embed", "x"))
    assert message == f"no answer from the model API at {api.url} within 0.5 s (--timeout)"


def test_an_answer_that_is_not_json(api: FakeModelApi) -> None:
    api.failures["/v1/embeddings"] = (200, b"<html>hello</html>")
    message = one_line_error(client_app("--api-url", api.url, "embed", "x"))
    assert message.startswith(f"POST {api.url}/v1/embeddings answered 200 with text/html, not JSON")


def test_an_answer_with_missing_embeddings(api: FakeModelApi) -> None:
    api.failures["/v1/embeddings"] = (200, {"data": []})
    message = one_line_error(client_app("--api-url", api.url, "embed", "x", "y"))
    assert message == f"unexpected answer from {api.url}/v1/embeddings: 0 embeddings for 2 inputs"


def test_bad_local_input_exits_2_without_sending(api: FakeModelApi, tmp_path: Path) -> None:
    missing = tmp_path / "missing.txt"
    message = one_line_error(client_app("--api-url", api.url, "search", "--docs", str(missing), "q"), code=2)
    assert message == f"cannot read the documents file {missing}: No such file or directory"
    (tmp_path / "bad.json").write_text('["a", 3]')
    message = one_line_error(
        client_app("--api-url", api.url, "search", "--docs", str(tmp_path / "bad.json"), "q"), 2
    )
    assert message == f"{tmp_path / 'bad.json'} must be a JSON list of strings"
    message = one_line_error(client_app("--api-url", api.url, "predict", "--input", "[1, 2, 3]"), code=2)
    assert message == "input 'pixels' of shape [-1, 64] cannot hold rows of 3 values"
    message = one_line_error(client_app("--api-url", "ftp://x", "embed", "x"), code=2)
    assert message == "the model API URL 'ftp://x' is not an http:// or https:// URL with a host"
    assert [r.path for r in api.requests] == ["/v2/models/digits"]


def test_load_against_a_failing_api_reports_and_fails(api: FakeModelApi) -> None:
    api.failures["/v1/embeddings"] = (500, {"error": {"code": "internal", "message": "boom"}})
    result = client_app("--api-url", api.url, "load", "--requests", "6", "--json", "--no-progress")
    message = one_line_error(result)
    assert message == (
        f"6 of 6 requests failed; the first error: POST {api.url}/v1/embeddings answered 500 Internal Server Error: "
        "internal: boom"
    )
    report = json.loads(result.stdout)
    assert (report["ok"], report["failed"], report["errors"][0]["count"]) == (0, 6, 6)
    assert report["latency_ms"]["p50"] is None


def test_load_with_the_api_down() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    result = client_app("--api-url", url, "load", "--requests", "3", "--no-progress")
    message = one_line_error(result)
    assert message.startswith("3 of 3 requests failed; the first error: the model API at")
    assert "done: 0 ok, 3 failed" in result.stdout
