"""The Open Inference Protocol (KServe v2), as Triton and KServe serve it over HTTP/JSON.

Server: `GET /v2`, `/v2/health/live`, `/v2/health/ready`. Per model (optionally under
`/versions/{version}`, where the version is the model's weights digest): `GET /v2/models/{name}`
(metadata), `GET .../ready`, `POST .../infer`.

Metadata carries, besides the protocol's fields, `max_batch_size` (Triton's convention): N > 0 when the
model's first dimension is a batch dimension, whose rows are independent and may be split across
requests or gathered into one forward pass of up to N rows; 0 when requests run whole.

The embedding models are served here too: input `text` (BYTES, [-1]), output `embedding` (FP32,
[-1, dimension]).

Tensors travel as JSON `data` or, with the binary tensor data extension (as Triton and KServe do it), as
raw bytes after the JSON: a request whose header `Inference-Header-Content-Length: N` is present has N
bytes of JSON, then each input that carries `parameters.binary_data_size` (in the order of `inputs`)
takes that many bytes. An output is returned as raw bytes when its `parameters.binary_data` is true, or,
when it says nothing, when the request's `parameters.binary_data_output` is; the answer then carries the
same header, `Content-Type: application/octet-stream` and `parameters.binary_data_size` per raw output.

Errors here are `{"error": "<message>"}` (model_api.errors).
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
from fastapi import APIRouter, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from model_api import __version__
from model_api.errors import ApiError, validation_error
from model_api.models.base import EmbeddingRow
from model_api.models.registry import Registry, ServedModel
from model_api.requestlog import annotate
from model_api.settings import Settings
from model_api.tensors import (
    BINARY_HEADER,
    TensorError,
    TensorSpec,
    datatype_of,
    decode_binary_tensor,
    decode_tensor,
    encode_binary_tensor,
    encode_tensor,
)

EXTENSIONS = ["binary_tensor_data"]


class TensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int]


class ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]
    max_batch_size: int = Field(
        description="Rows per forward pass when the first dimension is a batch; else 0."
    )


class ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class Liveness(BaseModel):
    live: bool


class Readiness(BaseModel):
    ready: bool


class ModelReadiness(BaseModel):
    name: str
    ready: bool


class RequestInput(BaseModel):
    model_config = ConfigDict(extra="ignore")

    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, Any] | None = Field(
        None, description="`binary_data_size`: the input's raw bytes follow the JSON (binary extension)."
    )
    data: Any = Field(None, description="Row-major elements, flat or nested lists (absent when binary).")

    @model_validator(mode="after")
    def _data_or_binary(self) -> RequestInput:
        if self.data is None and "binary_data_size" not in (self.parameters or {}):
            raise ValueError(
                "give the input's 'data', or its raw bytes after the JSON with 'parameters': "
                "{'binary_data_size': N} (binary tensor data extension)"
            )
        return self

    @property
    def binary_size(self) -> int | None:
        return None if self.parameters is None else self.parameters.get("binary_data_size")


class RequestOutput(BaseModel):
    model_config = ConfigDict(extra="ignore")

    name: str
    parameters: dict[str, Any] | None = Field(
        None, description="`binary_data`: true returns this output as raw bytes after the JSON."
    )


class InferenceRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    id: str | None = None
    parameters: dict[str, Any] | None = Field(
        None,
        description="`binary_data_output`: true returns every output as raw bytes unless it says otherwise.",
    )
    inputs: list[RequestInput]
    outputs: list[RequestOutput] | None = Field(None, description="Outputs to return (default: all).")


class ResponseOutput(BaseModel):
    name: str
    datatype: str
    shape: list[int]
    parameters: dict[str, Any] | None = Field(None, description="`binary_data_size` for a raw output.")
    data: list[Any] | None = Field(None, description="Row-major flat elements (absent for a raw output).")


class InferenceResponse(BaseModel):
    model_name: str
    model_version: str
    id: str | None = None
    outputs: list[ResponseOutput]


def metadata(served: ServedModel) -> ModelMetadata:
    model = served.model
    return ModelMetadata(
        name=served.name,
        versions=[served.version],
        platform=model.platform,
        inputs=[TensorMetadata(**spec.metadata()) for spec in model.inputs],
        outputs=[TensorMetadata(**spec.metadata()) for spec in model.outputs],
        max_batch_size=served.max_batch_size,
    )


def _tensor_error(error: TensorError, name: str) -> ApiError:
    return ApiError(400, error.code, error.message, param=f"inputs.{name}", expected=error.expected)


def _binary_error(message: str) -> ApiError:
    return ApiError(400, "invalid_binary_data", message, param="inputs")


async def read_request(request: Request) -> tuple[InferenceRequest, dict[str, bytes]]:
    """The request's JSON and, with the binary extension, each binary input's raw bytes by name."""
    body = await request.body()
    header = request.headers.get(BINARY_HEADER)
    json_length = len(body)
    if header is not None:
        if not header.strip().isdigit() or int(header) > len(body):
            raise _binary_error(
                f"{BINARY_HEADER} is '{header}'; it must be the number of JSON bytes at the start of "
                f"the body ({len(body)} bytes)."
            )
        json_length = int(header)
    if not body[:json_length].strip():
        raise ApiError(400, "invalid_request", "The request has no JSON; send an inference request object.")
    try:
        parsed = InferenceRequest.model_validate_json(body[:json_length])
    except ValidationError as error:
        raise validation_error(RequestValidationError(error.errors())) from None
    return parsed, _split_binary(parsed.inputs, body[json_length:], header is not None)


def _split_binary(inputs: list[RequestInput], binary: bytes, has_header: bool) -> dict[str, bytes]:
    raw: dict[str, bytes] = {}
    offset = 0
    for tensor in inputs:
        size = tensor.binary_size
        if size is None:
            continue
        if not has_header:
            raise _binary_error(
                f"Input '{tensor.name}' has binary_data_size but the request has no {BINARY_HEADER} "
                "header saying where its JSON ends."
            )
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise _binary_error(f"Input '{tensor.name}' has binary_data_size {size!r}; give a byte count.")
        if tensor.data is not None:
            raise _binary_error(f"Input '{tensor.name}' has both 'data' and binary_data_size; give one.")
        if offset + size > len(binary):
            raise _binary_error(
                f"Input '{tensor.name}' declares {size} bytes of binary data but only "
                f"{len(binary) - offset} remain after the JSON."
            )
        raw[tensor.name] = binary[offset : offset + size]
        offset += size
    if offset != len(binary):
        raise _binary_error(
            f"{len(binary) - offset} bytes after the JSON belong to no input; each binary input names its "
            "size in parameters.binary_data_size."
        )
    return raw


def _decode_inputs(
    model_inputs: tuple[TensorSpec, ...], given: list[RequestInput], raw: dict[str, bytes]
) -> dict[str, np.ndarray]:
    """Every input of the model, exactly once, checked against its spec."""
    if not given:
        raise ApiError(
            400, "empty_input", "'inputs' is empty; give every input of the model.", param="inputs"
        )
    specs = {spec.name: spec for spec in model_inputs}
    expected = [spec.metadata() for spec in model_inputs]
    arrays: dict[str, np.ndarray] = {}
    for tensor in given:
        if tensor.name not in specs:
            raise ApiError(
                400,
                "unknown_input",
                f"The model has no input '{tensor.name}'; its inputs are {', '.join(specs)}.",
                param="inputs",
                expected=expected,
            )
        if tensor.name in arrays:
            raise ApiError(400, "duplicate_input", f"Input '{tensor.name}' is given twice.", param="inputs")
        try:
            spec = specs[tensor.name]
            arrays[tensor.name] = (
                decode_binary_tensor(spec, tensor.datatype, tensor.shape, raw[tensor.name])
                if tensor.name in raw
                else decode_tensor(spec, tensor.datatype, tensor.shape, tensor.data)
            )
        except TensorError as error:
            raise _tensor_error(error, tensor.name) from error
    missing = [name for name in specs if name not in arrays]
    if missing:
        raise ApiError(
            400,
            "missing_input",
            f"Input '{missing[0]}' is missing; the model needs {', '.join(specs)}.",
            param="inputs",
            expected=expected,
        )
    return arrays


def _batch_size(served: ServedModel, arrays: dict[str, np.ndarray], settings: Settings) -> int:
    sizes = {int(array.shape[0]) for array in arrays.values()}
    if len(sizes) > 1:
        raise ApiError(
            400, "wrong_shape", f"The inputs disagree on the batch size (first dimension): {sorted(sizes)}."
        )
    size = sizes.pop()
    if size == 0:
        raise ApiError(
            400, "empty_input", "The inputs hold no rows (the first dimension is 0).", param="inputs"
        )
    if size > settings.max_inputs:
        raise ApiError(
            413,
            "too_many_inputs",
            f"The request holds {size} rows; at most {settings.max_inputs} fit in one request. Split it.",
            param="inputs",
            limit=settings.max_inputs,
        )
    return size


def _texts(array: np.ndarray, settings: Settings) -> list[str]:
    texts = [str(text) for text in array.reshape(-1)]
    for index, text in enumerate(texts):
        if not text:
            raise ApiError(400, "empty_input", f"Text {index} is empty.", param="inputs.text")
        if len(text) > settings.max_text_chars:
            raise ApiError(
                413,
                "input_too_long",
                f"Text {index} has {len(text)} characters; at most {settings.max_text_chars} are accepted.",
                param="inputs.text",
                limit=settings.max_text_chars,
            )
    return texts


async def run_inference(
    served: ServedModel,
    body: InferenceRequest,
    request: Request,
    settings: Settings,
    raw: dict[str, bytes] | None = None,
) -> dict[str, np.ndarray]:
    """Decode, check, batch and run; the outputs by name, stacked over the request's rows."""
    model = served.model
    arrays = _decode_inputs(model.inputs, body.inputs, raw or {})
    if model.kind == "embedding":
        _batch_size(served, arrays, settings)
        rows: list[Any] = _texts(arrays[model.inputs[0].name], settings)
        annotate(request, rows=len(rows))
        embeddings: list[EmbeddingRow] = await served.infer(rows)
        return {model.outputs[0].name: np.stack([row.vector for row in embeddings])}
    if not model.batchable:
        annotate(request, rows=1)
        return dict((await served.infer([arrays]))[0])
    size = _batch_size(served, arrays, settings)
    annotate(request, rows=size)
    results: list[dict[str, np.ndarray]] = await served.infer(
        [{name: array[index] for name, array in arrays.items()} for index in range(size)]
    )
    return {spec.name: np.stack([result[spec.name] for result in results]) for spec in model.outputs}


def _wants_binary(body: InferenceRequest, output_name: str) -> bool:
    """Triton's rule: the output's own `binary_data`, else the request's `binary_data_output`."""
    for requested in body.outputs or []:
        if requested.name == output_name and "binary_data" in (requested.parameters or {}):
            return bool((requested.parameters or {})["binary_data"])
    return bool((body.parameters or {}).get("binary_data_output", False))


def inference_response(
    served: ServedModel, body: InferenceRequest, outputs: dict[str, np.ndarray], names: list[str]
) -> Response:
    """JSON, or JSON then raw bytes with the binary extension's header when any output is raw."""
    described: list[dict[str, Any]] = []
    raw: list[bytes] = []
    for name in names:
        array = outputs[name]
        datatype = datatype_of(array)
        if _wants_binary(body, name):
            data = encode_binary_tensor(datatype, array)
            raw.append(data)
            described.append(
                {
                    "name": name,
                    "datatype": datatype,
                    "shape": list(array.shape),
                    "parameters": {"binary_data_size": len(data)},
                }
            )
        else:
            described.append(encode_tensor(name, datatype, array))
    answer = {"model_name": served.name, "model_version": served.version, "id": body.id, "outputs": described}
    if not raw:
        return JSONResponse(answer)
    header = json.dumps(answer, separators=(",", ":")).encode()
    return Response(
        header + b"".join(raw),
        media_type="application/octet-stream",
        headers={BINARY_HEADER: str(len(header))},
    )


def kserve_router(registry: Registry, settings: Settings) -> APIRouter:
    router = APIRouter(prefix="/v2", tags=["Open Inference Protocol (KServe v2)"])

    def resolve(request: Request, name: str, version: str | None) -> ServedModel:
        served = registry.get(name)
        annotate(request, model=served.name)
        if version is not None and version != served.version:
            raise ApiError(
                404,
                "version_not_found",
                f"Model '{name}' has version {served.version} only, not '{version}'.",
                param="version",
            )
        return served

    @router.get("", response_model=ServerMetadata)
    async def server_metadata() -> ServerMetadata:
        return ServerMetadata(name="model-api", version=__version__, extensions=EXTENSIONS)

    @router.get("/health/live", response_model=Liveness)
    async def live() -> Liveness:
        return Liveness(live=True)

    @router.get("/health/ready", response_model=Readiness)
    async def ready() -> Readiness:
        # Models load before the server listens: answering at all means every model is ready.
        return Readiness(ready=True)

    @router.get("/models/{name}", response_model=ModelMetadata)
    @router.get("/models/{name}/versions/{version}", response_model=ModelMetadata)
    async def model_metadata(name: str, request: Request, version: str | None = None) -> ModelMetadata:
        return metadata(resolve(request, name, version))

    @router.get("/models/{name}/ready", response_model=ModelReadiness)
    @router.get("/models/{name}/versions/{version}/ready", response_model=ModelReadiness)
    async def model_ready(name: str, request: Request, version: str | None = None) -> ModelReadiness:
        return ModelReadiness(name=resolve(request, name, version).name, ready=True)

    # The body is read by hand (JSON, or JSON then raw tensors); the schema is declared for /docs.
    documented = {
        "requestBody": {"required": True, "content": {"application/json": {"schema": _request_schema()}}}
    }

    @router.post("/models/{name}/infer", response_model=InferenceResponse, openapi_extra=documented)
    @router.post(
        "/models/{name}/versions/{version}/infer", response_model=InferenceResponse, openapi_extra=documented
    )
    async def infer(name: str, request: Request, version: str | None = None) -> Response:
        served = resolve(request, name, version)
        body, raw = await read_request(request)
        wanted = [output.name for output in body.outputs] if body.outputs else None
        known = [spec.name for spec in served.model.outputs]
        for output_name in wanted or []:
            if output_name not in known:
                raise ApiError(
                    400,
                    "unknown_output",
                    f"The model has no output '{output_name}'; its outputs are {', '.join(known)}.",
                    param="outputs",
                    expected=known,
                )
        outputs = await run_inference(served, body, request, settings, raw)
        return inference_response(served, body, outputs, wanted or known)

    return router


def _request_schema() -> dict[str, Any]:
    """InferenceRequest's JSON schema with its definitions inlined (it sits inside an OpenAPI operation)."""
    schema = InferenceRequest.model_json_schema()
    definitions = schema.pop("$defs", {})

    def inline(node: Any) -> Any:
        if isinstance(node, dict):
            if "$ref" in node:
                return inline(definitions[node["$ref"].rsplit("/", 1)[-1]])
            return {key: inline(value) for key, value in node.items()}
        if isinstance(node, list):
            return [inline(item) for item in node]
        return node

    inlined: dict[str, Any] = inline(schema)
    return inlined
