"""The error shapes of the model server: one per protocol, chosen by the route.

Everywhere but `/v2`:

    {"error": {"code": "<snake_case>", "message": "<what happened and what to fix>", ...}}

Optional fields (`param`, `expected`, `limit`, ...) add what a program needs to react. Under `/v2`, the
Open Inference Protocol (KServe v2) prescribes a bare string, which Triton's and KServe's clients read:

    {"error": "<what happened and what to fix>"}

with Triton's status codes (400 for every invalid request, where FastAPI would say 422). The request log
records the `code` either way. `ApiError` is a Starlette `HTTPException` so that it passes unchanged
through FastAPI's body reading (where the body size limit raises it) and reaches the one handler that
renders it.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from model_api.requestlog import annotate


class ApiError(StarletteHTTPException):
    """An answer to a request that cannot be served, with the status and code that say why."""

    def __init__(self, status: int, code: str, message: str, **fields: Any) -> None:
        super().__init__(status_code=status, detail=message)
        self.code = code
        self.message = message
        self.fields = {key: value for key, value in fields.items() if value is not None}

    def body(self) -> dict[str, Any]:
        return error_body(self.code, self.message, **self.fields)


def error_body(code: str, message: str, **fields: Any) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, **fields}}


KSERVE_PREFIX = "/v2"


def is_kserve_path(path: str) -> bool:
    """Whether a request path is one of the Open Inference Protocol's routes."""
    return path == KSERVE_PREFIX or path.startswith(KSERVE_PREFIX + "/")


def kserve_status(status: int) -> int:
    """Triton's status for an error: an invalid request is 400 there, never 422."""
    return 400 if status == 422 else status


def error_response(error: ApiError, path: str = "") -> JSONResponse:
    """The error in the shape of the protocol that `path` belongs to."""
    headers = {"Retry-After": "1"} if error.status_code == 503 else None
    if is_kserve_path(path):
        return JSONResponse(
            {"error": error.message}, status_code=kserve_status(error.status_code), headers=headers
        )
    return JSONResponse(error.body(), status_code=error.status_code, headers=headers)


# Starlette raises plain HTTPExceptions for routing; give them codes a program can match.
_HTTP_CODES = {
    404: ("not_found", "No such route. The routes are listed at /docs."),
    405: ("method_not_allowed", "This route does not accept that method."),
}


def _location(loc: Any) -> str:
    parts = [str(part) for part in loc if part != "body"]
    return ".".join(parts) if parts else "body"


def validation_error(exc: RequestValidationError) -> ApiError:
    """A request whose JSON does not fit the schema (422), or is no JSON at all (400)."""
    errors = list(exc.errors())
    if any(error.get("type") == "json_invalid" for error in errors):
        detail = next(error for error in errors if error.get("type") == "json_invalid")
        reason = (detail.get("ctx") or {}).get("error", "")
        return ApiError(
            400,
            "invalid_json",
            f"The request body is not valid JSON ({reason}). Send a JSON object with "
            "Content-Type: application/json.",
        )
    first = errors[0] if errors else {"loc": ("body",), "msg": "invalid request"}
    # A value matching no member of a union gives one error per member, each located under the
    # member's name: the field is where their locations part.
    locations = [tuple(error.get("loc", ("body",))) for error in errors] or [("body",)]
    shared = locations[0]
    for location in locations[1:]:
        common = 0
        while common < min(len(shared), len(location)) and shared[common] == location[common]:
            common += 1
        shared = shared[:common]
    param = _location(shared)
    reason = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    if param == "body" and first.get("type") == "missing":
        message = "The request has no body; send a JSON object with Content-Type: application/json."
    elif first.get("type") == "missing":
        message = f"The field '{param}' is required."
    elif len(errors) > 1 and len(set(locations)) > 1:
        message = f"The field '{param}' has none of the accepted forms ({reason})."
    else:
        message = f"The field '{param}' is invalid: {reason.rstrip('.')}."
    return ApiError(422, "invalid_request", message, param=param)


def install_error_handlers(app: FastAPI) -> None:
    """Render every error FastAPI or Starlette can raise in the one shape."""

    def respond(request: Request, error: ApiError) -> JSONResponse:
        annotate(request, error=error.code)
        return error_response(error, request.scope["path"])

    async def on_http_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        if isinstance(exc, ApiError):
            return respond(request, exc)
        code, message = _HTTP_CODES.get(exc.status_code, ("http_error", str(exc.detail)))
        return respond(request, ApiError(exc.status_code, code, message))

    async def on_validation_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        return respond(request, validation_error(exc))

    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
