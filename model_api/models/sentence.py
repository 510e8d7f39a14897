"""Text embedding models from sentence-transformers directories (all-MiniLM-L6-v2 by default).

Loading never reaches the network: the Hugging Face libraries run offline and the directory must hold
every file. A batch is tokenised here rather than by `SentenceTransformer.encode`, so that rows given as
texts and rows given as token ids share one padded forward pass; the pooling and normalisation modules
are the directory's own, so the vectors equal `encode`'s (tests check this).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import torch

from model_api.models.base import EmbeddingRow
from model_api.models.digest import directory_files, tensors_digest
from model_api.tensors import TensorSpec

for _variable in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_DISABLE_PROGRESS_BARS"):
    os.environ.setdefault(_variable, "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def is_sentence_transformers_dir(path: Path) -> bool:
    return path.is_dir() and (
        (path / "modules.json").exists() or (path / "config_sentence_transformers.json").exists()
    )


class SentenceModel:
    """A sentence-transformers model in eval mode on one device."""

    kind: Literal["embedding"] = "embedding"
    platform = "sentence_transformers"
    batchable = True

    def __init__(self, name: str, source: Path, device: str) -> None:
        from sentence_transformers import SentenceTransformer

        self.name = name
        self.device = torch.device(device)
        self._model = SentenceTransformer(str(source), device=device, local_files_only=True)
        self._model.eval()
        tokenizer = self._model.tokenizer
        self._tokenizer = tokenizer
        self.max_tokens = int(self._model.max_seq_length or tokenizer.model_max_length)
        self.vocab_size = len(tokenizer)
        dimension = getattr(self._model, "get_embedding_dimension", None)
        if dimension is None:
            dimension = self._model.get_sentence_embedding_dimension
        self.dimension = int(dimension() or 0)
        self._pad_id = int(tokenizer.pad_token_id or 0)
        self._token_types = "token_type_ids" in tokenizer.model_input_names
        # Entries of the library's own features that are not tensors (e.g. {"modality": "text"}).
        preprocess = getattr(self._model, "preprocess", None) or self._model.tokenize
        self._extra_features = {
            key: value for key, value in preprocess(["x"]).items() if not isinstance(value, torch.Tensor)
        }
        self.inputs = (TensorSpec("text", "BYTES", (-1,)),)
        self.outputs = (TensorSpec("embedding", "FP32", (-1, self.dimension)),)
        self.digest = tensors_digest(self._model.state_dict(), extra=directory_files(source))
        self.run_batch(["warm up"])  # the first pass is slow (allocations); do not make a client wait for it

    def token_ids(self, texts: list[str]) -> list[list[int]]:
        """The ids the model reads for each text: special tokens added, cut at `max_tokens`."""
        encoded = self._tokenizer(texts, add_special_tokens=True, truncation=True, max_length=self.max_tokens)
        return [list(ids) for ids in encoded["input_ids"]]

    def run_batch(self, rows: list[Any]) -> list[EmbeddingRow]:
        """Embed texts and token-id lists in one padded forward pass."""
        texts = [row for row in rows if isinstance(row, str)]
        tokenised = iter(self.token_ids(texts)) if texts else iter(())
        sequences = [next(tokenised) if isinstance(row, str) else list(row) for row in rows]
        longest = max(len(ids) for ids in sequences)
        input_ids = torch.full((len(sequences), longest), self._pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(sequences), longest), dtype=torch.long)
        for index, ids in enumerate(sequences):
            input_ids[index, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            attention_mask[index, : len(ids)] = 1
        features: dict[str, Any] = {
            "input_ids": input_ids.to(self.device),
            "attention_mask": attention_mask.to(self.device),
        }
        if self._token_types:
            features["token_type_ids"] = torch.zeros_like(features["input_ids"])
        features.update(self._extra_features)
        with torch.inference_mode():
            embeddings = self._model(features)["sentence_embedding"]
        vectors = embeddings.float().cpu().numpy()
        return [EmbeddingRow(vectors[index], len(ids)) for index, ids in enumerate(sequences)]
