"""What every request goes through, whatever its route: one ASGI middleware, outermost.

- every response, errors and 404s included, carries `X-Model-Version` (the deployment version);
- a body larger than `max_body_bytes` is refused with 413 (by its Content-Length before reading it,
  or while it streams in);
- a body that is not JSON is refused with 415, unless it is a KServe binary tensor request (header
  `Inference-Header-Content-Length`, any Content-Type); a body without a Content-Type is read as JSON;
- an unexpected exception becomes a 500 in the one error shape, and the server stays up;
- one log line per request (`requestlog`), with the client's pseudonym and never its address.
"""

from __future__ import annotations

import logging
import time

from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from model_api import requestlog
from model_api.errors import ApiError, error_response, is_kserve_path
from model_api.settings import Settings
from model_api.tensors import BINARY_HEADER

logger = logging.getLogger(__name__)

VERSION_HEADER = "X-Model-Version"
_BODY_METHODS = {"POST", "PUT", "PATCH"}


def _is_json(content_type: str) -> bool:
    media_type = content_type.split(";", 1)[0].strip().lower()
    return media_type == "application/json" or (
        media_type.startswith("application/") and media_type.endswith("+json")
    )


class RequestMiddleware:
    def __init__(self, app: ASGIApp, *, version: str, settings: Settings) -> None:
        self.app = app
        self.version = version
        self.max_body_bytes = settings.max_body_bytes
        self.pseudonym_header = settings.client_pseudonym_header

    def _refusal(self, scope: Scope, headers: Headers) -> ApiError | None:
        """A reason to answer before reading the body, if there is one."""
        if scope["method"] not in _BODY_METHODS:
            return None
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
            return self._too_large(int(length))
        has_body = (length is not None and length != "0") or "transfer-encoding" in headers
        content_type = headers.get("content-type")
        if BINARY_HEADER in headers and is_kserve_path(scope["path"]):
            return None  # JSON then raw tensors: the route reads and checks both
        if has_body and content_type is None:
            scope["headers"] = [*scope["headers"], (b"content-type", b"application/json")]
        elif has_body and content_type is not None and not _is_json(content_type):
            return ApiError(
                415,
                "unsupported_media_type",
                f"The body is {content_type}; send JSON with Content-Type: application/json "
                f"(or, to /v2, JSON then raw tensors with the header {BINARY_HEADER}).",
            )
        return None

    def _too_large(self, size: int | None) -> ApiError:
        told = f"{size} bytes" if size is not None else "more bytes than allowed"
        return ApiError(
            413,
            "body_too_large",
            f"The request body has {told}; at most {self.max_body_bytes} are accepted. "
            "Send fewer inputs per request.",
            limit=self.max_body_bytes,
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        headers = Headers(scope=scope)
        fields = requestlog.fields_of(scope)
        status = 500
        response_started = False

        async def send_with_version(message: Message) -> None:
            nonlocal status, response_started
            if message["type"] == "http.response.start":
                response_started = True
                status = message["status"]
                MutableHeaders(scope=message)[VERSION_HEADER] = self.version
            await send(message)

        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    raise self._too_large(None)  # FastAPI passes HTTPExceptions through to the handler
            return message

        try:
            refusal = self._refusal(scope, headers)
            if refusal is not None:
                fields["error"] = refusal.code
                await error_response(refusal, scope["path"])(scope, receive, send_with_version)
            else:
                await self.app(scope, limited_receive, send_with_version)
        except Exception as error:
            if isinstance(error, ApiError):
                failure = error
            else:
                logger.exception("unexpected error serving %s %s", scope["method"], scope["path"])
                failure = ApiError(
                    500, "internal_error", f"The server failed: {type(error).__name__}: {error}"
                )
            fields["error"] = failure.code
            if not response_started:
                await error_response(failure, scope["path"])(scope, receive, send_with_version)
        finally:
            requestlog.write(
                {
                    "method": scope["method"],
                    "path": scope["path"],
                    "status": status,
                    "duration_ms": round((time.perf_counter() - started) * 1000, 3),
                    "client": requestlog.pseudonym(headers.get(self.pseudonym_header)),
                    **fields,
                }
            )
