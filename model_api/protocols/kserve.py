"""The Open Inference Protocol (KServe v2), as Triton and KServe serve it over HTTP/JSON.

Server: `GET /v2`, `/v2/health/live`, `/v2/health/ready`. Per model (optionally under
`/versions/{version}`, where the version is the model's weights digest): `GET /v2/models/{name}`
(metadata), `GET .../ready`, `POST .../infer`.

Metadata carries, besides the protocol's fields, `max_batch_size` (Triton's convention): N > 0 when the
model's first dimension is a batch dimension, whose rows are independent and may be split across
requests or gathered into one forward pass of up to N rows; 0 when requests run whole.

The embedding models are served here too: input `text` (BYTES, [-1]), output `embedding` (FP32,
[-1, dimension]). Only JSON tensor data is accepted (not the binary tensor extension).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field

from model_api import __version__
from model_api.errors import ApiError
from model_api.models.base import EmbeddingRow
from model_api.models.registry import Registry, ServedModel
from model_api.requestlog import annotate
from model_api.settings import Settings
from model_api.tensors import TensorError, TensorSpec, datatype_of, decode_tensor, encode_tensor


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
    parameters: dict[str, Any] | None = None
    data: Any = Field(description="Row-major elements, flat or nested lists.")


class RequestOutput(BaseModel):
    model_config = ConfigDict(extra="ignore")

    name: str
    parameters: dict[str, Any] | None = None


class InferenceRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    id: str | None = None
    parameters: dict[str, Any] | None = None
    inputs: list[RequestInput]
    outputs: list[RequestOutput] | None = Field(None, description="Outputs to return (default: all).")


class ResponseOutput(BaseModel):
    name: str
    datatype: str
    shape: list[int]
    data: list[Any]


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


def _decode_inputs(model_inputs: tuple[TensorSpec, ...], given: list[RequestInput]) -> dict[str, np.ndarray]:
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
            arrays[tensor.name] = decode_tensor(
                specs[tensor.name], tensor.datatype, tensor.shape, tensor.data
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
    served: ServedModel, body: InferenceRequest, request: Request, settings: Settings
) -> dict[str, np.ndarray]:
    """Decode, check, batch and run; the outputs by name, stacked over the request's rows."""
    model = served.model
    arrays = _decode_inputs(model.inputs, body.inputs)
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
        return ServerMetadata(name="model-api", version=__version__, extensions=[])

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

    @router.post("/models/{name}/infer", response_model=InferenceResponse)
    @router.post("/models/{name}/versions/{version}/infer", response_model=InferenceResponse)
    async def infer(
        name: str, body: InferenceRequest, request: Request, version: str | None = None
    ) -> InferenceResponse:
        served = resolve(request, name, version)
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
        outputs = await run_inference(served, body, request, settings)
        return InferenceResponse(
            model_name=served.name,
            model_version=served.version,
            id=body.id,
            outputs=[
                ResponseOutput(
                    **encode_tensor(output_name, datatype_of(outputs[output_name]), outputs[output_name])
                )
                for output_name in wanted or known
            ],
        )

    return router
