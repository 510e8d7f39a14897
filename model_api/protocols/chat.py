"""The OpenAI text generation API: `POST /v1/chat/completions` and `POST /v1/completions`.

Both run on a chat model's generation engine (`model_api.generation`). A chat request's `messages` are
rendered with the model's own chat template; a completion's `prompt` is read as plain text. Answers
follow OpenAI's shapes field for field, so the official SDK reads them unchanged:

- `stream: false`: one `chat.completion` (or `text_completion`) object with `usage`;
- `stream: true`: Server-Sent Events, each `data: {chunk}`: per choice a first chunk with the role,
  then content deltas as the tokens are generated, a last chunk with an empty delta and the
  `finish_reason`; with `stream_options.include_usage` a final chunk with no choices and the `usage`
  (`usage: null` on the others); then `data: [DONE]`.

`temperature` 0 decodes greedily (the same answer every time); otherwise a `seed` makes sampling
reproducible. Every answer carries `X-Input-Tokens` (the prompt's tokens); `system_fingerprint` is the
model's version. A client that goes away (a closed connection) stops its generation at the next token.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Request, Response
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from model_api.errors import ApiError
from model_api.generation.engine import (
    Delta,
    EngineClosed,
    Finished,
    Generation,
    GenerationEngine,
    GenerationFailed,
    Overloaded,
)
from model_api.generation.sampling import SamplingParams
from model_api.models.registry import Registry
from model_api.requestlog import annotate
from model_api.settings import Settings

INPUT_TOKENS_HEADER = "X-Input-Tokens"
MAX_STOPS = 4

# Requests


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = Field(
        None, description="The message's text, or a list of text parts (other part types are refused)."
    )
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class StreamOptions(BaseModel):
    include_usage: bool = Field(False, description="Send a last chunk with the usage and no choices.")


class GenerationFields(BaseModel):
    """What chat and completion requests share: the model, how much to generate, and how to choose."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = Field(None, description="Chat model name (default: the first chat model loaded).")
    max_tokens: Annotated[int, Field(ge=1)] | None = Field(
        None, description="Most tokens to generate per choice (default and limit: the server's)."
    )
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] | None = Field(
        None, description="0 decodes greedily (deterministic); higher samples more freely. Default 1."
    )
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] | None = Field(
        None, description="Nucleus sampling: draw from the most likely tokens holding this much mass."
    )
    n: Annotated[int, Field(ge=1)] | None = Field(None, description="How many choices to generate.")
    seed: int | None = Field(None, description="Makes sampling reproducible: same seed, same answer.")
    stop: str | Annotated[list[str], Field(max_length=MAX_STOPS)] | None = Field(
        None, description=f"Up to {MAX_STOPS} sequences that end a choice (never included in it)."
    )
    stream: bool | None = Field(False, description="Send the answer as Server-Sent Events while generated.")
    stream_options: StreamOptions | None = None
    logprobs: bool | None = Field(None, description="Not supported: true is refused.")
    user: str | None = Field(None, description="Accepted and ignored.")


class ChatCompletionRequest(GenerationFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1)] = Field(
        description="The conversation so far; the model answers the last message."
    )
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = Field(
        None, description="The newer name of max_tokens; wins when both are given."
    )
    tools: list[Any] | None = Field(None, description="Not supported: a non-empty list is refused.")


class CompletionRequest(GenerationFields):
    prompt: str | Annotated[list[str], Field(min_length=1, max_length=1)] = Field(
        description="The text to continue (or a list holding one text)."
    )
    echo: bool | None = Field(None, description="Not supported: true is refused.")
    suffix: str | None = Field(None, description="Not supported: a suffix is refused.")


# Responses


class CompletionUsage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str
    refusal: None = None


FinishReason = Literal["stop", "length"]


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: None = None
    finish_reason: FinishReason


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    system_fingerprint: str
    choices: list[ChatChoice]
    usage: CompletionUsage


class ChoiceDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(BaseModel):
    index: int
    delta: ChoiceDelta
    logprobs: None = None
    finish_reason: FinishReason | None = None


class ChatCompletionChunk(BaseModel):
    """One Server-Sent Event of a streamed chat answer (`data: {...}`)."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    system_fingerprint: str
    choices: list[ChunkChoice]
    usage: CompletionUsage | None = None


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: None = None
    finish_reason: FinishReason | None


class Completion(BaseModel):
    """A `text_completion`: the whole answer, or (streamed) one event of it."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    system_fingerprint: str
    choices: list[CompletionChoice]
    usage: CompletionUsage | None = None


# Checking a request against the model and the server's limits


def sampling_params(body: GenerationFields, limit: int, max_tokens: int | None) -> SamplingParams:
    if body.logprobs:
        raise ApiError(400, "unsupported_parameter", "'logprobs' is not supported here.", param="logprobs")
    wanted = max_tokens if max_tokens is not None else limit
    if wanted > limit:
        raise ApiError(
            400,
            "max_tokens_too_large",
            f"'max_tokens' is {wanted}; this server generates at most {limit} tokens per answer.",
            param="max_tokens",
            limit=limit,
        )
    stops = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
    return SamplingParams(
        max_tokens=wanted,
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        seed=body.seed,
        stops=tuple(stop for stop in stops if stop),
    )


def check_prompt(prompt_ids: list[int], engine: GenerationEngine, settings: Settings) -> None:
    limit = min(settings.max_prompt_tokens, engine.model.context_tokens - 1)
    if len(prompt_ids) > limit:
        raise ApiError(
            400,
            "prompt_too_long",
            f"The prompt has {len(prompt_ids)} tokens; model '{engine.name}' reads at most {limit}. "
            "Shorten the messages.",
            param="messages",
            limit=limit,
        )


def check_choices(n: int | None, settings: Settings) -> int:
    choices = n or 1
    if choices > settings.max_generation_batch:
        raise ApiError(
            400,
            "too_many_choices",
            f"'n' is {choices}; at most {settings.max_generation_batch} choices fit in one request.",
            param="n",
            limit=settings.max_generation_batch,
        )
    return choices


def submit(engine: GenerationEngine, prompt_ids: list[int], params: SamplingParams, n: int) -> Generation:
    try:
        return engine.submit(prompt_ids, params, n)
    except Overloaded as error:
        raise ApiError(
            503,
            "overloaded",
            f"Chat model '{engine.name}' has too much queued work ({error}); retry shortly.",
        ) from error
    except EngineClosed as error:
        raise ApiError(
            503, "shutting_down", "The server is shutting down; retry on another instance or later."
        ) from error


def failure(error: Exception) -> ApiError:
    if isinstance(error, EngineClosed):
        return ApiError(503, "shutting_down", "The server shut down before the answer was complete; retry.")
    return ApiError(500, "generation_failed", f"The model failed while generating: {error}")


# Running a generation for a client that may go away


@contextlib.asynccontextmanager
async def cancelled_on_disconnect(request: Request, generation: Generation) -> AsyncIterator[None]:
    """Cancel `generation` when the client disconnects, or when the block ends early for any reason."""

    async def watch() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass
        generation.cancel()

    watcher = asyncio.create_task(watch())
    try:
        yield
    finally:
        generation.cancel()  # a no-op once every choice is complete
        watcher.cancel()


async def collect(request: Request, generation: Generation) -> tuple[list[str], list[str]]:
    """Every choice's whole text and finish reason."""
    texts = [""] * generation.n
    reasons = ["stop"] * generation.n
    async with cancelled_on_disconnect(request, generation):
        try:
            async for event in generation.events():
                if isinstance(event, Delta):
                    texts[event.index] += event.text
                else:
                    reasons[event.index] = event.reason
        except (EngineClosed, GenerationFailed) as error:
            raise failure(error) from error
    return texts, reasons


def usage(generation: Generation) -> CompletionUsage:
    prompt = len(generation.prompt_ids)
    return CompletionUsage(
        prompt_tokens=prompt,
        completion_tokens=generation.completion_tokens,
        total_tokens=prompt + generation.completion_tokens,
    )


def sse(payload: dict[str, Any] | str) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {data}\n\n".encode()


async def event_stream(
    request: Request,
    generation: Generation,
    chunk: Callable[[int, Delta | Finished], dict[str, Any]],
    opener: Callable[[int], dict[str, Any]] | None,
    usage_chunk: Callable[[], dict[str, Any]] | None,
) -> AsyncIterator[bytes]:
    """The SSE body: `opener(index)` per choice (chat's role chunks), one chunk per event, usage, [DONE]."""
    async with cancelled_on_disconnect(request, generation):
        if opener is not None:
            for index in range(generation.n):
                yield sse(opener(index))
        try:
            async for event in generation.events():
                yield sse(chunk(event.index, event))
        except (EngineClosed, GenerationFailed) as error:
            yield sse(failure(error).body())
            return
        if usage_chunk is not None:
            yield sse(usage_chunk())
        annotate(request, completion_tokens=generation.completion_tokens)
        yield sse("[DONE]")


def streaming_response(body: AsyncIterator[bytes], generation: Generation) -> StreamingResponse:
    return StreamingResponse(
        body,
        media_type="text/event-stream",
        headers={INPUT_TOKENS_HEADER: str(len(generation.prompt_ids))},
    )


def chat_router(registry: Registry, settings: Settings) -> APIRouter:
    router = APIRouter(prefix="/v1", tags=["OpenAI"])

    async def start(
        request: Request,
        body: GenerationFields,
        prompt: Callable[[GenerationEngine], list[int]],
        max_tokens: int | None,
    ) -> tuple[GenerationEngine, Generation]:
        engine = registry.chat_model(body.model)
        annotate(request, model=engine.name)
        params = sampling_params(body, settings.max_generated_tokens, max_tokens)
        n = check_choices(body.n, settings)
        # Tokenising a long prompt takes a while: off the event loop.
        prompt_ids = await asyncio.to_thread(prompt, engine)
        check_prompt(prompt_ids, engine, settings)
        annotate(request, prompt_tokens=len(prompt_ids), choices=n)
        return engine, submit(engine, prompt_ids, params, n)

    @router.post(
        "/chat/completions",
        response_model=ChatCompletion,
        responses={200: {"content": {"text/event-stream": {}}, "description": "With stream: chunks."}},
    )
    async def create_chat_completion(
        body: ChatCompletionRequest, request: Request, response: Response
    ) -> ChatCompletion | StreamingResponse:
        if body.tools:
            raise ApiError(
                400,
                "unsupported_parameter",
                "'tools' (function calling) is not supported here.",
                param="tools",
            )
        messages = [
            {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
            for m in body.messages
        ]
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        engine, generation = await start(
            request, body, lambda engine: engine.model.chat_prompt(messages), max_tokens
        )
        answer_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        fingerprint = engine.model.digest[:16]

        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)

            def chunk(index: int, event: Delta | Finished | None) -> dict[str, Any]:
                """A content delta, a choice's end (empty delta), or with no event its opener (the role)."""
                if event is None:
                    delta = ChoiceDelta(role="assistant", content="")
                else:
                    delta = ChoiceDelta(content=event.text if isinstance(event, Delta) else None)
                reason = event.reason if isinstance(event, Finished) else None
                payload = ChatCompletionChunk(
                    id=answer_id,
                    created=created,
                    model=engine.name,
                    system_fingerprint=fingerprint,
                    choices=[ChunkChoice(index=index, delta=delta, finish_reason=reason)],  # type: ignore[arg-type]
                ).model_dump()
                payload["choices"][0]["delta"] = delta.model_dump(exclude_none=True)
                if not include_usage:
                    del payload["usage"]
                return payload

            def usage_chunk() -> dict[str, Any]:
                return ChatCompletionChunk(
                    id=answer_id,
                    created=created,
                    model=engine.name,
                    system_fingerprint=fingerprint,
                    choices=[],
                    usage=usage(generation),
                ).model_dump()

            return streaming_response(
                event_stream(
                    request,
                    generation,
                    chunk,
                    lambda index: chunk(index, None),
                    usage_chunk if include_usage else None,
                ),
                generation,
            )

        texts, reasons = await collect(request, generation)
        response.headers[INPUT_TOKENS_HEADER] = str(len(generation.prompt_ids))
        annotate(request, completion_tokens=generation.completion_tokens)
        return ChatCompletion(
            id=answer_id,
            created=created,
            model=engine.name,
            system_fingerprint=fingerprint,
            choices=[
                ChatChoice(index=index, message=AssistantMessage(content=text), finish_reason=reason)  # type: ignore[arg-type]
                for index, (text, reason) in enumerate(zip(texts, reasons, strict=True))
            ],
            usage=usage(generation),
        )

    @router.post(
        "/completions",
        response_model=Completion,
        responses={200: {"content": {"text/event-stream": {}}, "description": "With stream: chunks."}},
    )
    async def create_completion(
        body: CompletionRequest, request: Request, response: Response
    ) -> Completion | StreamingResponse:
        if body.echo:
            raise ApiError(400, "unsupported_parameter", "'echo' is not supported here.", param="echo")
        if body.suffix:
            raise ApiError(400, "unsupported_parameter", "'suffix' is not supported here.", param="suffix")
        text = body.prompt if isinstance(body.prompt, str) else body.prompt[0]
        engine, generation = await start(
            request, body, lambda engine: engine.model.text_prompt(text), body.max_tokens
        )
        answer_id, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        fingerprint = engine.model.digest[:16]

        def completion(choices: list[CompletionChoice], with_usage: bool) -> Completion:
            return Completion(
                id=answer_id,
                created=created,
                model=engine.name,
                system_fingerprint=fingerprint,
                choices=choices,
                usage=usage(generation) if with_usage else None,
            )

        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)

            def chunk(index: int, event: Delta | Finished) -> dict[str, Any]:
                text = event.text if isinstance(event, Delta) else ""
                reason = event.reason if isinstance(event, Finished) else None
                payload = completion(
                    [CompletionChoice(index=index, text=text, finish_reason=reason)],  # type: ignore[arg-type]
                    False,
                ).model_dump()
                if not include_usage:
                    del payload["usage"]
                return payload

            usage_chunk = (lambda: completion([], True).model_dump()) if include_usage else None
            # Completions streams have no role chunks: no opener.
            return streaming_response(event_stream(request, generation, chunk, None, usage_chunk), generation)

        texts, reasons = await collect(request, generation)
        response.headers[INPUT_TOKENS_HEADER] = str(len(generation.prompt_ids))
        annotate(request, completion_tokens=generation.completion_tokens)
        return completion(
            [
                CompletionChoice(index=index, text=text, finish_reason=reason)  # type: ignore[arg-type]
                for index, (text, reason) in enumerate(zip(texts, reasons, strict=True))
            ],
            True,
        )

    return router
