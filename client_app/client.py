"""A small client for the model API: OpenAI embeddings and the Open Inference Protocol (KServe v2).

Every request goes through a `requests.Session`, so `HTTP_PROXY`, `HTTPS_PROXY`, `ALL_PROXY`, `NO_PROXY`
and `REQUESTS_CA_BUNDLE` apply exactly as requests applies them. In particular a loopback model API
(`http://127.0.0.1:8000`) is reached *through* the proxy named by `HTTP_PROXY` unless `NO_PROXY` names its
host (`127.0.0.1`, `127.0.0.0/8` or `*`; `localhost` only matches the name `localhost`).

Every failure is raised as a `ClientError` whose message is one line a person can act on:

>>> client = ModelApiClient("http://127.0.0.1:8000")
>>> client.embed(["a cat on a mat"]).vectors[0][:3]        # doctest: +SKIP
[0.0123, -0.0456, 0.0789]

A `ModelApiClient` owns one `requests.Session`; requests does not promise that a session is safe to share
between threads, so give each thread its own client (as `client_app.load` does). Its connections to a
proxy have Nagle's algorithm off (`NoDelayAdapter`), as its direct connections have by urllib3's default.
"""

from __future__ import annotations

import html
import os
import re
import socket
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlsplit

import requests
from requests.adapters import HTTPAdapter
from requests.utils import select_proxy

DEFAULT_API_URL = "http://127.0.0.1:8000"
API_URL_ENV = "MODEL_API_URL"
DEFAULT_EMBEDDING_MODEL = "all-MiniLM-L6-v2"
DEFAULT_TIMEOUT = 30.0

# Response headers worth showing a user: the proxy's cache decision, key and rows served from the cache
# (`X-Cache-Rows: 3/4` for a batch), and the model deployment's version.
CACHE_HEADERS = (
    "X-Cache",
    "X-Cache-Key",
    "X-Cache-Rows",
    "X-Cache-Usage",
    "X-Cache-Saved-Tokens",
    "X-Model-Version",
)


class ClientError(Exception):
    """A failure explained in one line; `status` is the HTTP status when the server answered."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(" ".join(message.split()))
        self.status = status


class InputError(ClientError):
    """The user's own input (a file, a JSON argument) cannot be used; nothing was sent."""


@dataclass(frozen=True)
class Reply:
    """A successful (2xx) answer with a JSON body."""

    method: str
    url: str
    status: int
    headers: Mapping[str, str]
    body: Any
    seconds: float
    proxy: str | None

    @property
    def x_cache(self) -> str | None:
        return self.headers.get("X-Cache")

    def cache_headers(self) -> dict[str, str]:
        return {name: self.headers[name] for name in CACHE_HEADERS if name in self.headers}


@dataclass(frozen=True)
class Embeddings:
    vectors: list[list[float]]
    reply: Reply


@dataclass(frozen=True)
class TensorSpec:
    """One input or output of a tensor model as its KServe v2 metadata declares it (-1: any size)."""

    name: str
    datatype: str
    shape: list[int]


@dataclass(frozen=True)
class ModelMetadata:
    name: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    raw: Mapping[str, Any]


def api_url_from_env(environ: Mapping[str, str] = os.environ) -> str:
    return environ.get(API_URL_ENV) or DEFAULT_API_URL


def normalise_api_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InputError(f"the model API URL {url!r} is not an http:// or https:// URL with a host")
    return url.rstrip("/")


class NoDelayAdapter(HTTPAdapter):
    """requests' adapter with `TCP_NODELAY` on connections to a proxy too.

    urllib3 turns Nagle's algorithm off for direct connections but leaves it on for connections to a
    proxy (urllib3 #2936). A POST then sends its body only once the proxy has acknowledged the head, and
    a proxy whose kernel delays that acknowledgement (Linux: up to 40 ms) makes every request wait.
    """

    SOCKET_OPTIONS = ((socket.IPPROTO_TCP, socket.TCP_NODELAY, 1),)

    def proxy_manager_for(self, proxy: str, **proxy_kwargs: Any) -> Any:
        proxy_kwargs.setdefault("socket_options", list(self.SOCKET_OPTIONS))
        return super().proxy_manager_for(proxy, **proxy_kwargs)


class ModelApiClient:
    """The model API at `api_url`, reached with `requests` (and so through `HTTP_PROXY` when set)."""

    def __init__(
        self,
        api_url: str | None = None,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        headers: Mapping[str, str] | None = None,
        verify: bool | str = True,
        session: requests.Session | None = None,
    ) -> None:
        self.api_url = normalise_api_url(api_url or api_url_from_env())
        self.timeout = timeout
        self.verify = verify
        if session is None:
            session = requests.Session()
            session.headers["User-Agent"] = f"client-app {requests.utils.default_user_agent()}"
            session.mount("http://", NoDelayAdapter())
            session.mount("https://", NoDelayAdapter())
        self.session = session
        if headers:
            self.session.headers.update(headers)

    def close(self) -> None:
        self.session.close()

    def __enter__(self) -> ModelApiClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- the two protocols ---------------------------------------------------------------------------

    def embed(self, texts: Sequence[str], model: str = DEFAULT_EMBEDDING_MODEL) -> Embeddings:
        """Embeddings of `texts`, in their order, from `POST /v1/embeddings`."""
        reply = self.call("POST", "/v1/embeddings", {"input": list(texts), "model": model})
        return Embeddings(vectors=parse_embeddings(reply, len(texts)), reply=reply)

    def model_metadata(self, name: str) -> ModelMetadata:
        """`GET /v2/models/{name}`: the names, datatypes and shapes of the model's tensors."""
        reply = self.call("GET", f"/v2/models/{quote(name, safe='')}")
        return parse_metadata(reply, name)

    def infer(self, name: str, inputs: Sequence[Mapping[str, Any]]) -> Reply:
        """`POST /v2/models/{name}/infer` with KServe v2 `inputs`; the reply's body holds `outputs`."""
        reply = self.call("POST", f"/v2/models/{quote(name, safe='')}/infer", {"inputs": list(inputs)})
        outputs = reply.body.get("outputs") if isinstance(reply.body, dict) else None
        if not isinstance(outputs, list) or not outputs:
            raise ClientError(f"unexpected answer from {reply.url}: no `outputs` list in the JSON body")
        return reply

    def call(self, method: str, path: str, payload: Any = None) -> Reply:
        """One JSON request to the model API; any failure becomes a one-line `ClientError`."""
        url = self.api_url + path
        response, seconds = self.send(method, url, json=payload, target=f"the model API at {self.api_url}")
        proxy = self.proxy_for(url)
        if response.status_code >= 400:
            raise http_error(method, url, response, proxy)
        try:
            body = response.json()
        except ValueError:
            kind = response.headers.get("Content-Type", "no content type")
            raise ClientError(
                f"{method} {url} answered {response.status_code} with {kind}, not JSON — "
                "does --api-url (or MODEL_API_URL) point at the model API?",
                response.status_code,
            ) from None
        return Reply(method, url, response.status_code, response.headers, body, seconds, proxy)

    # -- any URL --------------------------------------------------------------------------------------

    def fetch(self, url: str, method: str = "GET") -> tuple[requests.Response, float]:
        """Any request (for example to an external site through the proxy); the caller reads the status."""
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise InputError(f"{url!r} is not an http:// or https:// URL with a host")
        return self.send(method, url, target=f"{parts.scheme}://{parts.netloc}")

    def proxy_for(self, url: str) -> str | None:
        """The proxy requests will use for `url` (from the environment and `NO_PROXY`), or None; as
        output shows it, without a password (`HTTP_PROXY=http://user:password@host:port`)."""
        settings = self.session.merge_environment_settings(url, {}, None, None, None)
        proxy = select_proxy(url, settings["proxies"])
        return without_password(proxy) if proxy else proxy

    def send(
        self, method: str, url: str, *, json: Any = None, target: str
    ) -> tuple[requests.Response, float]:
        """Send one request; network failures become a `ClientError` naming `target` or the proxy."""
        started = time.perf_counter()
        try:
            # `verify` per request, so that an explicit CA bundle wins over REQUESTS_CA_BUNDLE.
            response = self.session.request(method, url, json=json, timeout=self.timeout, verify=self.verify)
        except requests.RequestException as exc:
            raise network_error(exc, url, target, self.proxy_for(url), self.timeout) from None
        return response, time.perf_counter() - started


# -- parsing answers ---------------------------------------------------------------------------------


def parse_embeddings(reply: Reply, expected: int) -> list[list[float]]:
    data = reply.body.get("data") if isinstance(reply.body, dict) else None
    if not isinstance(data, list):
        raise ClientError(f"unexpected answer from {reply.url}: no `data` list in the JSON body")
    if len(data) != expected:
        raise ClientError(f"unexpected answer from {reply.url}: {len(data)} embeddings for {expected} inputs")
    ordered: list[list[float] | None] = [None] * expected
    for position, item in enumerate(data):
        index = item.get("index", position) if isinstance(item, dict) else None
        vector = item.get("embedding") if isinstance(item, dict) else None
        if not isinstance(index, int) or not 0 <= index < expected or ordered[index] is not None:
            raise ClientError(
                f"unexpected answer from {reply.url}: bad or repeated `index` in data[{position}]"
            )
        if not isinstance(vector, list) or not all(isinstance(v, int | float) for v in vector):
            raise ClientError(
                f"unexpected answer from {reply.url}: data[{position}].embedding is not a list of numbers"
            )
        ordered[index] = [float(v) for v in vector]
    return [vector for vector in ordered if vector is not None]


def parse_metadata(reply: Reply, name: str) -> ModelMetadata:
    body = reply.body if isinstance(reply.body, dict) else {}

    def specs(key: str) -> list[TensorSpec]:
        found = []
        for item in body.get(key) or []:
            try:
                found.append(
                    TensorSpec(str(item["name"]), str(item["datatype"]), [int(d) for d in item["shape"]])
                )
            except (KeyError, TypeError, ValueError):
                raise ClientError(
                    f"unexpected metadata from {reply.url}: each of `{key}` needs name, datatype and shape"
                ) from None
        return found

    inputs = specs("inputs")
    if not inputs:
        raise ClientError(f"model {name!r} declares no inputs in {reply.url}; it is not a tensor model")
    return ModelMetadata(str(body.get("name", name)), inputs, specs("outputs"), body)


# -- one-line errors ---------------------------------------------------------------------------------


def error_message(response: requests.Response) -> str:
    """The message of an error body: `{"error": {"code", "message"}}`, FastAPI's `detail`, or the text."""
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict) and error.get("message"):
            code = error.get("code")
            return f"{code}: {error['message']}" if code not in (None, "") else str(error["message"])
        if isinstance(error, str) and error:
            return error
        detail = body.get("detail")
        if isinstance(detail, str) and detail:
            return detail
        if isinstance(detail, list) and detail:
            first = detail[0]
            if isinstance(first, dict) and "msg" in first:
                where = ".".join(str(part) for part in first.get("loc", []))
                return f"{where}: {first['msg']}" if where else str(first["msg"])
    text = response.text
    if text.lstrip().startswith("<"):  # an HTML error page, such as mitmproxy's own: keep its words
        text = html.unescape(re.sub(r"<[^>]*>", " ", re.sub(r"(?is)<head.*?</head>", " ", text)))
    text = " ".join(text.split())
    text = text.removeprefix(status_line(response)).strip()  # the page's heading repeats the status line
    return text[:200] + ("…" if len(text) > 200 else "") if text else "(empty body)"


def status_line(response: requests.Response) -> str:
    """`502 Bad Gateway`, or just `502` when the server sent no reason phrase."""
    return f"{response.status_code} {response.reason or ''}".strip()


def without_password(url: str) -> str:
    """`url` without its user and password, for messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    return parts._replace(netloc=parts.netloc.rsplit("@", 1)[-1]).geturl()


def http_error(method: str, url: str, response: requests.Response, proxy: str | None) -> ClientError:
    via = f" (through the proxy at {proxy})" if proxy else ""
    hint = ""
    if response.status_code == 407:
        where = urlsplit(proxy).netloc.rsplit("@", 1)[-1] if proxy else "host:port"
        hint = f" — give client-app the proxy's credentials: HTTP_PROXY=http://USER:PASSWORD@{where}"
    return ClientError(
        f"{method} {url} answered {status_line(response)}{via}: {error_message(response)}{hint}",
        response.status_code,
    )


def _causes(exc: BaseException) -> Iterator[BaseException]:
    """`exc` and everything it wraps: urllib3 keeps causes in `reason`, `args` and `__cause__`."""
    pending, seen = [exc], set()
    while pending:
        current = pending.pop(0)
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        wrapped = [getattr(current, "reason", None), current.__cause__, current.__context__, *current.args]
        pending.extend(item for item in wrapped if isinstance(item, BaseException))


def _root_reason(exc: BaseException) -> str:
    innermost = list(_causes(exc))[-1]
    text = str(innermost) or type(innermost).__name__
    # urllib3 prefixes the connection object's repr (the reason follows it); OpenSSL appends its source line.
    return re.sub(r"\s*\(_ssl\.c:\d+\)", "", text.rsplit("): ", 1)[-1])


def network_error(
    exc: requests.RequestException, url: str, target: str, proxy: str | None, timeout: float
) -> ClientError:
    """One line for a request that got no HTTP answer, naming the proxy when it is the proxy's fault."""
    causes = list(_causes(exc))
    refused = any(isinstance(cause, ConnectionRefusedError) for cause in causes)
    via = f" through the proxy at {proxy}" if proxy else ""
    if isinstance(exc, requests.exceptions.SSLError):
        return ClientError(
            f"TLS verification failed for {url}{via}: {_root_reason(exc)} — a proxy that intercepts HTTPS "
            "needs its CA: pass --ca-bundle ~/.mitmproxy/mitmproxy-ca-cert.pem or set REQUESTS_CA_BUNDLE"
        )
    if isinstance(exc, requests.exceptions.ProxyError) and proxy:
        if refused:
            return ClientError(f"the proxy at {proxy} refused the connection — is forward-proxy running?")
        tunnel = next((str(c) for c in reversed(causes) if "Tunnel connection failed" in str(c)), None)
        if tunnel:
            return ClientError(f"the proxy at {proxy} would not open a tunnel to {target}: {tunnel}")
        return ClientError(f"could not reach the proxy at {proxy}: {_root_reason(exc)}")
    if isinstance(exc, requests.exceptions.ConnectTimeout):
        who = f"the proxy at {proxy}" if proxy else target
        return ClientError(f"{who} did not accept a connection within {timeout:g} s")
    if isinstance(exc, requests.exceptions.ReadTimeout):
        return ClientError(f"no answer from {target}{via} within {timeout:g} s (--timeout)")
    if isinstance(exc, requests.exceptions.ConnectionError):
        if refused:
            hint = " — is model-api serve running?" if target.startswith("the model API") else ""
            return ClientError(f"{target} refused the connection{hint}")
        if any("Name or service not known" in str(c) or "nodename nor servname" in str(c) for c in causes):
            return ClientError(f"cannot resolve the host of {url}{via}")
        return ClientError(f"the connection to {target}{via} failed: {_root_reason(exc)}")
    return ClientError(f"request to {url}{via} failed: {_root_reason(exc)}")
