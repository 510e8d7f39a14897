"""What the protocols need from a loaded model, whatever file it came from."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Protocol

import numpy as np

from model_api.tensors import TensorSpec


@dataclass(frozen=True)
class EmbeddingRow:
    """One input's embedding and how many tokens the model read for it."""

    vector: np.ndarray
    tokens: int


class Model(Protocol):
    """A model ready to run. `run_batch` runs on a worker thread, one call at a time.

    A `batchable` model's first dimension is the batch: every row of a request is independent, so rows
    of different requests can share a forward pass and `run_batch` gets one row per item. Otherwise each
    item is a whole request.
    """

    @property
    def name(self) -> str: ...
    @property
    def kind(self) -> Literal["embedding", "tensor"]: ...
    @property
    def platform(self) -> str: ...
    @property
    def inputs(self) -> tuple[TensorSpec, ...]: ...
    @property
    def outputs(self) -> tuple[TensorSpec, ...]: ...
    @property
    def batchable(self) -> bool: ...
    @property
    def digest(self) -> str:
        """Of the weights (`models.digest`): equal weights, equal digest."""
        ...

    def run_batch(self, rows: list[Any]) -> list[Any]: ...


class EmbeddingModel(Model, Protocol):
    """A text embedding model: rows are texts, or lists of the model's own token ids."""

    @property
    def dimension(self) -> int: ...
    @property
    def max_tokens(self) -> int: ...
    @property
    def vocab_size(self) -> int: ...

    def run_batch(self, rows: list[Any]) -> list[EmbeddingRow]: ...
