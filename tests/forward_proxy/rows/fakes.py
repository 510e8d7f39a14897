"""Fake models that answer exactly as the model API writes its answers, to check merges byte for byte."""

from __future__ import annotations

import base64
import hashlib
import json
import math
import random
import struct
from typing import Any

from forward_proxy.cache.rows import Number, dump, flatten
from forward_proxy.cache.upstream import UpstreamResponse

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


class ModelUpstream:
    """Stands in for the cache's UpstreamClient: a model API speaking both protocols, counting rows.

    `report_tokens` adds X-Input-Tokens (each input's prompt tokens); `version` changes the vectors too,
    so rows of two versions never look alike; a text "bad" is refused with a 400 naming its position;
    `gate` holds every inference call until set.
    """

    def __init__(self, *, report_tokens: bool = True, max_batch_size: int = 8) -> None:
        self.report_tokens = report_tokens
        self.max_batch_size = max_batch_size
        self.version = "v1"
        self.calls: list[tuple[str, str, dict[str, str], Any]] = []  # method, path, headers, JSON body
        self.failure: Exception | None = None
        self.status: int | None = None
        self.gate: Any = None
        self.verify_tls = True

    def inference_calls(self) -> list[Any]:
        return [body for method, path, _, body in self.calls if method == "POST"]

    def rows_computed(self) -> list[Any]:
        """Every row the model computed, in the order received."""
        rows: list[Any] = []
        for body in self.inference_calls():
            if "input" in body:
                rows.extend(embedding_rows(body["input"]))
            else:
                features = body["inputs"][-1]
                width = math.prod(features["shape"][1:])
                flat = flatten(features["data"])
                rows.extend(flat[index : index + width] for index in range(0, len(flat), width))
        return rows

    async def request(
        self,
        scheme: str,
        host: str,
        port: int,
        method: str,
        target: str,
        headers: Any,
        body: bytes,
        timeout: float,
        server_name: str | None = None,
    ) -> UpstreamResponse:
        document = json.loads(body) if body else None
        fields = {name.decode().lower(): value.decode() for name, value in headers}
        self.calls.append((method, target, fields, document))
        if method == "POST" and self.gate is not None:
            await self.gate.wait()
        if self.failure is not None:
            raise self.failure
        answer_headers = [(b"content-type", b"application/json"), (b"x-model-version", self.version.encode())]
        if method == "GET" and target.startswith("/v2/models/"):
            name = target.split("/")[3]
            content = dump({"name": name, "versions": ["1"], "max_batch_size": self.max_batch_size})
        elif method == "GET":
            content = b'{"live":true}'
        elif self.status is not None:
            content = dump({"error": {"code": "overloaded", "message": "try later"}})
            return UpstreamResponse(self.status, b"", tuple(answer_headers), content, 0.01)
        elif target == "/v1/embeddings":
            rows = embedding_rows(document["input"])
            if "bad" in rows:
                message = f"'input[{rows.index('bad')}]' is bad"
                return UpstreamResponse(
                    400, b"", tuple(answer_headers), dump({"error": {"message": message}}), 0.01
                )
            content, counts = embeddings_answer(document, self.version)
            if self.report_tokens:
                answer_headers.append((b"x-input-tokens", counts.encode()))
        else:
            content = inference_answer(document, version=self.version)
        return UpstreamResponse(200, b"OK", tuple(answer_headers), content, 0.05 * max(1, _rows_of(document)))

    def close(self) -> None:
        pass


def _rows_of(document: Any) -> int:
    if not isinstance(document, dict):
        return 0
    if "input" in document:
        return len(embedding_rows(document["input"]))
    return int(document["inputs"][0]["shape"][0])
