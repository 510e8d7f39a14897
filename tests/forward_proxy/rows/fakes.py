"""Fake models that answer exactly as the model API writes its answers, to check merges byte for byte."""

from __future__ import annotations

import base64
import hashlib
import random
import struct
from typing import Any

from forward_proxy.cache.rows import Number, dump, flatten

EMBEDDING_MODEL = "all-MiniLM-L6-v2"
DIMENSION = 8


def _float32(value: float) -> float:
    return float(struct.unpack("<f", struct.pack("<f", value))[0])


def written(value: float) -> Number:
    """A float as pydantic (serde) writes it: `1.5e-8` where Python writes `1.5e-08`."""
    return Number(repr(value).replace("e-0", "e-").replace("e+", "e"))


def _vector(row: Any, dimensions: int | None, version: str) -> list[float]:
    seed = hashlib.sha256(repr((row, version)).encode()).digest()
    generator = random.Random(seed)
    vector = [generator.uniform(-1, 1) * 10 ** generator.randint(-9, 0) for _ in range(DIMENSION)]
    vector = vector[: dimensions or DIMENSION]
    norm = sum(value * value for value in vector) ** 0.5
    return [_float32(value / norm) for value in vector]


def tokens_of(row: Any) -> int:
    """What the model reads: token ids as given; text as words plus the two special tokens."""
    return len(row) if isinstance(row, list) else len(row.split()) + 2


def embedding_rows(given: Any) -> list[Any]:
    single = isinstance(given, str) or bool(given and isinstance(given[0], int))
    return [given] if single else list(given)


def embeddings_answer(document: dict[str, Any], version: str = "v1") -> tuple[bytes, str]:
    """The model API's answer to an embeddings request, and its X-Input-Tokens header."""
    rows = embedding_rows(document["input"])
    counts = [tokens_of(row) for row in rows]
    data = []
    for index, row in enumerate(rows):
        vector = _vector(row, document.get("dimensions"), version)
        if document.get("encoding_format") == "base64":
            embedding: Any = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
        else:
            embedding = [written(value) for value in vector]
        data.append({"object": "embedding", "embedding": embedding, "index": index})
    total = sum(counts)
    body = {
        "object": "list",
        "data": data,
        "model": document.get("model") or EMBEDDING_MODEL,
        "usage": {"prompt_tokens": total, "total_tokens": total},
    }
    return dump(body), ",".join(str(count) for count in counts)


def inference_answer(document: dict[str, Any], name: str = "scorer", version: str = "9f2c41d0") -> bytes:
    """A batching tensor model: per row, output `score` [2] (FP32) and `label` [] (INT64)."""
    inputs = {tensor["name"]: tensor for tensor in document["inputs"]}
    features = inputs["features"]
    rows = features["shape"][0]
    flat = flatten(features["data"])
    width = len(flat) // rows
    scores: list[Number] = []
    labels: list[int] = []
    for row in range(rows):
        values = flat[row * width : (row + 1) * width]
        weight = sum(flatten(inputs["weights"]["data"])[row * 2 : row * 2 + 2]) if "weights" in inputs else 1
        pair = [_float32(sum(values) * weight / 7), _float32(max(values) - min(values))]
        scores.extend(written(value) for value in pair)
        labels.append(int(pair[0] > pair[1]))
    outputs = [
        {"name": "score", "datatype": "FP32", "shape": [rows, 2], "data": scores},
        {"name": "label", "datatype": "INT64", "shape": [rows], "data": labels},
    ]
    wanted = [output["name"] for output in document.get("outputs") or []]
    if wanted:
        outputs = [output for want in wanted for output in outputs if output["name"] == want]
    return dump({"model_name": name, "model_version": version, "id": document.get("id"), "outputs": outputs})


def _rows_of(document: Any) -> int:
    if not isinstance(document, dict):
        return 0
    if "input" in document:
        return len(embedding_rows(document["input"]))
    return int(document["inputs"][0]["shape"][0])
