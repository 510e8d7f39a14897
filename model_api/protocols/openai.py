"""The OpenAI embeddings API: `POST /v1/embeddings`, `GET /v1/models`, `GET /v1/models/{id}`.

`input` is a string, a list of strings, a list of token ids or a list of such lists. Token ids are
refused by default (400 `token_ids_not_accepted`): ids of another tokenizer (LangChain's OpenAIEmbeddings
sends tiktoken's cl100k ids unless `check_embedding_ctx_length=False`) look exactly like the served
model's own and would embed as a silently wrong vector. With `accept_token_ids` (`--accept-token-ids`)
they are read as the served model's own vocabulary ids, used as given (a tokenizer's output, special
tokens included). Vectors leave as JSON floats or, with `encoding_format: "base64"`, as the
base64 of little-endian float32 bytes (what the official SDK asks for by default). `dimensions` keeps
the first N components and rescales the vector to unit length, as OpenAI's v3 models do.
"""

from __future__ import annotations

import base64
from typing import Annotated, Any, Literal, cast

import numpy as np
from fastapi import APIRouter, Request, Response
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictInt, StrictStr

from model_api.errors import ApiError
from model_api.models.base import EmbeddingModel, EmbeddingRow
from model_api.models.registry import Registry, ServedModel
from model_api.requestlog import annotate
from model_api.settings import Settings

TokenIds = list[StrictInt]
INPUT_TOKENS_HEADER = "X-Input-Tokens"
INPUT_FORMS = "a string, a list of strings, a list of token ids or a list of token-id lists"


def _check_input_form(value: Any) -> Any:
    """One readable error for an `input` of no accepted form (instead of one per union member)."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):

        def is_id(item: Any) -> bool:
            return isinstance(item, int) and not isinstance(item, bool)

        if all(isinstance(item, str) for item in value) or all(is_id(item) for item in value):
            return value
        if all(isinstance(item, list) and all(is_id(token) for token in item) for item in value):
            return value
    raise ValueError(f"'input' must be {INPUT_FORMS}")


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    input: Annotated[
        StrictStr | list[StrictStr] | TokenIds | list[TokenIds], BeforeValidator(_check_input_form)
    ] = Field(description=f"What to embed: {INPUT_FORMS}.")
    model: str | None = Field(None, description="Model name (default: the first embedding model loaded).")
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Annotated[int, Field(ge=1)] | None = Field(
        None, description="Keep this many leading components, renormalised to unit length."
    )
    user: str | None = Field(None, description="Accepted and ignored.")


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    embedding: list[float] | str
    index: int


class Usage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "model-api"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


def _rows(request: EmbeddingRequest, model: EmbeddingModel, settings: Settings) -> list[str | list[int]]:
    """The inputs as a list of rows, each checked against the limits."""
    given = request.input
    single = isinstance(given, str) or bool(given and isinstance(given[0], int))
    rows: list[Any] = [given] if single else list(given)
    if not rows:
        raise ApiError(400, "empty_input", "'input' is an empty list; give at least one text.", param="input")
    if len(rows) > settings.max_inputs:
        raise ApiError(
            413,
            "too_many_inputs",
            f"'input' holds {len(rows)} items; at most {settings.max_inputs} fit in one request. "
            "Split it into several requests.",
            param="input",
            limit=settings.max_inputs,
        )
    for index, row in enumerate(rows):
        param = "input" if single else f"input[{index}]"
        if isinstance(row, list) and row and not settings.accept_token_ids:
            raise ApiError(
                400,
                "token_ids_not_accepted",
                f"'{param}' is a list of token ids, which this server refuses: ids of another tokenizer "
                f"(such as tiktoken's, which LangChain's OpenAIEmbeddings sends by default) cannot be told "
                f"apart from those of {model.name}'s own tokenizer and would embed as a wrong vector. "
                "Send the text instead (LangChain: OpenAIEmbeddings(..., check_embedding_ctx_length=False)); "
                "ids of this model's own tokenizer are accepted when the server runs with --accept-token-ids.",
                param=param,
            )
        if not row:
            raise ApiError(
                400, "empty_input", f"'{param}' is empty; every input needs some text.", param=param
            )
        if isinstance(row, str):
            if len(row) > settings.max_text_chars:
                raise ApiError(
                    413,
                    "input_too_long",
                    f"'{param}' has {len(row)} characters; at most {settings.max_text_chars} are accepted.",
                    param=param,
                    limit=settings.max_text_chars,
                )
            continue
        if len(row) > model.max_tokens:
            raise ApiError(
                413,
                "input_too_long",
                f"'{param}' has {len(row)} token ids; model '{model.name}' reads at most {model.max_tokens}.",
                param=param,
                limit=model.max_tokens,
            )
        if min(row) < 0 or max(row) >= model.vocab_size:
            raise ApiError(
                400,
                "invalid_token",
                f"'{param}' holds a token id outside model '{model.name}''s vocabulary [0, {model.vocab_size}).",
                param=param,
            )
    return rows


def _encode(vector: np.ndarray, dimensions: int | None, encoding_format: str) -> list[float] | str:
    if dimensions is not None:
        vector = vector[:dimensions]
        norm = float(np.linalg.norm(vector))
        if norm > 0:
            vector = vector / norm
    vector = vector.astype("<f4", copy=False)
    if encoding_format == "base64":
        return base64.b64encode(vector.tobytes()).decode("ascii")
    return cast(list[float], vector.tolist())


def embedding_model(registry: Registry, name: str | None) -> tuple[ServedModel, EmbeddingModel]:
    if name is None:
        served = registry.default_embedding_model()
        if served is None:
            raise ApiError(
                400, "invalid_request", "No embedding model is loaded; give 'model'.", param="model"
            )
    else:
        served = registry.get(name)
    if served.model.kind != "embedding":
        raise ApiError(
            400,
            "not_an_embedding_model",
            f"Model '{served.name}' is a tensor model; call POST /v2/models/{served.name}/infer instead.",
            param="model",
        )
    return served, cast(EmbeddingModel, served.model)


def openai_router(registry: Registry, settings: Settings) -> APIRouter:
    router = APIRouter(prefix="/v1", tags=["OpenAI"])

    @router.post("/embeddings", response_model=EmbeddingResponse)
    async def create_embeddings(
        body: EmbeddingRequest, request: Request, response: Response
    ) -> EmbeddingResponse:
        served, model = embedding_model(registry, body.model)
        annotate(request, model=served.name)
        rows = _rows(body, model, settings)
        if body.dimensions is not None and body.dimensions > model.dimension:
            raise ApiError(
                400,
                "invalid_dimensions",
                f"'dimensions' is {body.dimensions}; model '{served.name}' gives at most {model.dimension}.",
                param="dimensions",
                expected=model.dimension,
            )
        annotate(request, rows=len(rows))
        results: list[EmbeddingRow] = await served.infer(rows)
        tokens = sum(result.tokens for result in results)
        # Each input's own count (usage has only the sum), so that a cache can answer batches row by row.
        response.headers[INPUT_TOKENS_HEADER] = ",".join(str(result.tokens) for result in results)
        return EmbeddingResponse(
            data=[
                Embedding(
                    embedding=_encode(result.vector, body.dimensions, body.encoding_format), index=index
                )
                for index, result in enumerate(results)
            ],
            model=served.name,
            usage=Usage(prompt_tokens=tokens, total_tokens=tokens),
        )

    @router.get("/models", response_model=ModelList)
    async def list_models() -> ModelList:
        return ModelList(data=[ModelCard(id=name) for name in [*registry.models, *registry.chat_models]])

    @router.get("/models/{name}", response_model=ModelCard)
    async def retrieve_model(name: str) -> ModelCard:
        return ModelCard(id=name if name in registry.chat_models else registry.get(name).name)

    return router
