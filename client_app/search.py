"""Semantic search over a small document file: embed the documents and the query, rank by cosine.

The documents are embedded in fixed batches and the query on its own, so the document batches are the
same requests whatever the query is: a second search over the same file (with any query) gets its
document embeddings from the proxy's cache.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from client_app.client import DEFAULT_EMBEDDING_MODEL, InputError, ModelApiClient, Reply

T = TypeVar("T")

DEFAULT_BATCH_SIZE = 16


@dataclass(frozen=True)
class Match:
    rank: int
    index: int  # position of the document in the file (0-based, blank lines skipped)
    score: float
    document: str


@dataclass(frozen=True)
class SearchResult:
    query: str
    matches: list[Match]
    document_replies: list[Reply]
    query_reply: Reply

    @property
    def replies(self) -> list[Reply]:
        return [*self.document_replies, self.query_reply]


def load_documents(path: Path) -> list[str]:
    """Documents from a file: a JSON list of strings, or else one document per non-blank line."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise InputError(f"cannot read the documents file {path}: {exc.strerror or exc}") from None
    if text.lstrip().startswith("["):
        try:
            loaded = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InputError(f"{path} starts like a JSON list but is not valid JSON: {exc}") from None
        if not isinstance(loaded, list) or not all(isinstance(item, str) for item in loaded):
            raise InputError(f"{path} must be a JSON list of strings")
        documents = [item.strip() for item in loaded if item.strip()]
    else:
        documents = [line.strip() for line in text.splitlines() if line.strip()]
    if not documents:
        raise InputError(f"{path} holds no documents")
    return documents


def batched(items: Sequence[T], size: int) -> list[list[T]]:
    if size < 1:
        raise ValueError("batch size must be at least 1")
    return [list(items[start : start + size]) for start in range(0, len(items), size)]


def cosine(a: Sequence[float], b: Sequence[float]) -> float:
    """Cosine similarity; 0.0 when either vector is all zeros."""
    if len(a) != len(b):
        raise ValueError(f"vectors of different lengths: {len(a)} and {len(b)}")
    norms = math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b))
    return sum(x * y for x, y in zip(a, b, strict=True)) / norms if norms else 0.0


def rank(query: Sequence[float], documents: Sequence[Sequence[float]], top: int) -> list[tuple[int, float]]:
    """(document index, score) of the `top` documents most similar to `query`, best first, ties by index."""
    scored = [(index, cosine(query, vector)) for index, vector in enumerate(documents)]
    scored.sort(key=lambda pair: (-pair[1], pair[0]))
    return scored[: max(top, 0)]


def search(
    client: ModelApiClient,
    documents: Sequence[str],
    query: str,
    *,
    top: int = 5,
    batch_size: int = DEFAULT_BATCH_SIZE,
    model: str = DEFAULT_EMBEDDING_MODEL,
) -> SearchResult:
    vectors: list[list[float]] = []
    document_replies: list[Reply] = []
    for batch in batched(documents, batch_size):
        embeddings = client.embed(batch, model=model)
        vectors.extend(embeddings.vectors)
        document_replies.append(embeddings.reply)
    asked = client.embed([query], model=model)
    matches = [
        Match(rank=position, index=index, score=score, document=documents[index])
        for position, (index, score) in enumerate(rank(asked.vectors[0], vectors, top), start=1)
    ]
    return SearchResult(query, matches, document_replies, asked.reply)
