"""Batched inference split into rows, and row answers merged back into the answer to the whole batch.

A batch pays only for the rows it has not seen: the cache looks every row up under its own key, sends the
rows it lacks upstream in one smaller request (in the client's order, each distinct row once) and puts
together exactly what the model would have answered to the whole batch. Two protocols carry such batches:

- OpenAI embeddings (`POST /v1/embeddings`, `split_embeddings`): every string of `input` is a row; a list
  of token ids is one row, and a list of token-id lists is one row per list.
- Open Inference Protocol, KServe v2 (`POST /v2/models/{name}/infer`, `split_inference`), for a model
  whose metadata says `max_batch_size` > 0: row i is slice i along the first dimension of every input.

A row's identity (`Row.key`) is its content together with the rest of the body, because that shapes its
answer too: for OpenAI everything but `input` (`model`, `encoding_format`, `dimensions`, `user`, ...);
for KServe every input's name, datatype, parameters and shape without the batch dimension, and every
body field but `inputs` and `id` (`id` is only echoed back). Fields in the cache's ignore list are left
out, as for whole requests. The caller adds the rest of the whole-request key (origin, path, credential
partition, namespace, model version).

A row's answer (`RowAnswer`) is what the model answers to a request holding that row alone; that is what
the cache stores for the row, so `forward-proxy cache show` displays an ordinary answer. An OpenAI row
keeps its prompt-token count in its answer's `usage`, so merged answers sum `usage` exactly. A multi-row
upstream answer only carries the batch's total, so a row's own count comes from the upstream's
`X-Input-Tokens` header (one count per input, comma-separated), from the row itself (token ids are read
as given), or by subtraction when exactly one row's count is unknown. A row whose count stays unknown is
still answered correctly but cannot be stored.

Merged answers are written as compact JSON (no spaces, non-ASCII kept), which is how FastAPI and so the
model API write theirs, and every number keeps the text the upstream gave it (`Number`), so a merged
answer holds the very bytes of each row's answer.

>>> batch = split_embeddings({"model": "m", "input": ["a", "b", "a"]})
>>> [row.content for row in batch.rows]
['a', 'b', 'a']
>>> batch.rows[0].key == batch.rows[2].key, batch.first_positions(range(3))
(True, [0, 1])
>>> batch.request_body([1])
b'{"model":"m","input":["b"]}'
"""

from __future__ import annotations

import json
import math
import re
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from forward_proxy.cache.canonical import canonical_json, drop_fields

JsonObject = dict[str, Any]
Protocol = Literal["openai-embeddings", "kserve-v2-infer", "whole"]

INPUT_TOKENS_HEADER = "X-Input-Tokens"
_INFER_PATH = re.compile(r"/v2/models/[^/]+(?:/versions/[^/]+)?/infer\Z")


def protocol_of(path: str) -> Protocol | None:
    """Which batched protocol a request path (without query) speaks, if any.

    >>> protocol_of("/v1/embeddings"), protocol_of("/v2/models/digits/infer"), protocol_of("/v2/models/x")
    ('openai-embeddings', 'kserve-v2-infer', None)
    """
    if path.endswith("/v1/embeddings"):
        return "openai-embeddings"
    if _INFER_PATH.search(path):
        return "kserve-v2-infer"
    return None


class AnswerMismatch(ValueError):
    """An upstream answer does not fit the rows it was asked for (not JSON, wrong count or shape)."""


@dataclass(frozen=True)
class Row:
    key: bytes  # canonical bytes of the row's content and of the rest of the body
    content: Any  # OpenAI: the string or token-id list; KServe: one flat data slice per input
    tokens: int | None = None  # prompt tokens known before asking (token-id rows), else None


@dataclass(frozen=True, eq=False)
class RowAnswer:
    """The answer to a request of one row alone. Compared by identity: a fresh answer is one computation.

    `raw` holds the stored bytes when the answer came from the store (or is a whole request's answer),
    so serving it again needs no re-encoding."""

    document: JsonObject | None
    tokens: int | None  # OpenAI: the row's prompt tokens; KServe and whole answers: 0
    estimated: bool = False  # `tokens` is the row's share of a batch's total, not its own count
    raw: bytes | None = None

    def body(self) -> bytes:
        if self.raw is not None:
            return self.raw
        assert self.document is not None
        return dump(self.document)


@dataclass(frozen=True)
class FreshRows:
    """The rows of one upstream answer, one per row sent, in the order sent."""

    answers: list[RowAnswer]


class Number(str):
    """A JSON number as the upstream wrote it, written back verbatim (`1e-8` stays `1e-8`, not `1e-08`)."""


def load(body: bytes | str) -> Any:
    """Parse JSON keeping every non-integer number's text (`Number`), so that `dump` rewrites it unchanged."""
    return json.loads(body, parse_float=Number)


def dump(document: Any) -> bytes:
    r"""Compact JSON with non-ASCII kept, as FastAPI writes it; `Number`s as they were read.

    >>> dump(load(b'{"v": [1.5e-8, 0.25, 1E3], "n": 3, "s": "caf\xc3\xa9"}'))
    b'{"v":[1.5e-8,0.25,1E3],"n":3,"s":"caf\xc3\xa9"}'
    """
    return "".join(_json_parts(document)).encode()


def _json_parts(value: Any) -> Iterator[str]:
    if isinstance(value, Number):
        yield value
    elif isinstance(value, dict):
        yield "{"
        for index, (name, inner) in enumerate(value.items()):
            if index:
                yield ","
            yield _string(name)
            yield ":"
            yield from _json_parts(inner)
        yield "}"
    elif isinstance(value, list | tuple):
        if value and all(type(item) is Number for item in value):
            yield "[" + ",".join(value) + "]"  # the common case: a tensor's numbers
            return
        yield "["
        for index, inner in enumerate(value):
            if index:
                yield ","
            yield from _json_parts(inner)
        yield "]"
    else:
        yield _string(value) if isinstance(value, str) else json.dumps(value)


def _string(value: str) -> str:
    return json.dumps(value, ensure_ascii=False)


def _load_object(body: bytes) -> JsonObject:
    try:
        document = load(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise AnswerMismatch(f"the answer is not JSON: {exc}") from None
    if not isinstance(document, dict):
        raise AnswerMismatch("the answer is not a JSON object")
    return document


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class Batch(ABC):
    """A request whose rows can be answered one by one."""

    protocol: Protocol

    def __init__(self, document: JsonObject, rows: Sequence[Row]) -> None:
        self.document = document
        self.rows = tuple(rows)

    def first_positions(self, positions: Iterable[int]) -> list[int]:
        """`positions` without those whose row repeats an earlier one (each distinct row computed once)."""
        seen: set[bytes] = set()
        first = []
        for position in positions:
            key = self.rows[position].key
            if key not in seen:
                seen.add(key)
                first.append(position)
        return first

    @abstractmethod
    def request_body(self, positions: Sequence[int]) -> bytes:
        """The request for the rows at `positions` (in that order), everything else as the client sent it."""

    @abstractmethod
    def fresh_answers(
        self, positions: Sequence[int], body: bytes, input_tokens: str | None = None
    ) -> FreshRows:
        """Split the answer `body` to `request_body(positions)` into row answers; `AnswerMismatch` if unfit.

        `input_tokens` is the upstream's `X-Input-Tokens` header, if it sent one.
        """

    @abstractmethod
    def load_answer(
        self, content: bytes, estimated: bool = False, tokens: int | None = None
    ) -> RowAnswer | None:
        """A stored row answer, or None when it is not one (then the row counts as missing).
        `estimated`: its token count was stored as an estimate; `tokens`: the count stored beside it,
        when there is one (then the answer is read only if rows must be put together)."""

    @abstractmethod
    def merge(self, answers: Sequence[RowAnswer]) -> bytes:
        """The answer to the whole batch, from one row answer per row in the client's order
        (`ValueError` when the row answers do not fit together)."""


# OpenAI embeddings ------------------------------------------------------------------------------------


def _embedding_rows(value: Any) -> list[Any] | None:
    """The rows of an `input`, or None when it is not a well-formed one (the upstream then says why)."""
    if isinstance(value, str):
        return [value] if value else None
    if not isinstance(value, list) or not value:
        return None
    if all(_is_int(item) for item in value):
        return [value]
    if all(isinstance(item, str) and item for item in value):
        return list(value)
    if all(isinstance(item, list) and item and all(_is_int(token) for token in item) for item in value):
        return list(value)
    return None


def split_embeddings(document: Any, ignore_fields: Sequence[str] = ()) -> EmbeddingBatch | None:
    """The rows of an OpenAI embeddings request, or None when its `input` is not a well-formed batch.

    >>> [row.tokens for row in split_embeddings({"input": [[101, 7592, 102], [101, 102]]}).rows]
    [3, 2]
    >>> split_embeddings({"input": ["fine", ""]}) is None
    True
    """
    if not isinstance(document, dict) or "input" not in document:
        return None
    contents = _embedding_rows(document["input"])
    if contents is None:
        return None
    rest = drop_fields({name: value for name, value in document.items() if name != "input"}, ignore_fields)
    prefix = b"openai-embeddings\n" + canonical_json(rest) + b"\n"
    rows = [
        Row(prefix + canonical_json(content), content, len(content) if isinstance(content, list) else None)
        for content in contents
    ]
    return EmbeddingBatch(document, rows)


class EmbeddingBatch(Batch):
    protocol: Protocol = "openai-embeddings"

    def request_body(self, positions: Sequence[int]) -> bytes:
        contents = [self.rows[position].content for position in positions]
        return dump({name: contents if name == "input" else value for name, value in self.document.items()})

    def fresh_answers(
        self, positions: Sequence[int], body: bytes, input_tokens: str | None = None
    ) -> FreshRows:
        answer = _load_object(body)
        data, usage = answer.get("data"), answer.get("usage")
        if not isinstance(data, list) or len(data) != len(positions):
            raise AnswerMismatch(f"the answer holds {_count(data)} embeddings for {len(positions)} inputs")
        if not all(isinstance(item, dict) for item in data):
            raise AnswerMismatch("an item of the answer's data is not an object")
        indices = [item.get("index") for item in data]
        if not all(_is_int(index) for index in indices) or sorted(indices) != list(range(len(data))):
            raise AnswerMismatch("the answer's data indices are not 0..n-1")
        data = sorted(data, key=lambda item: item["index"])
        total, usage_names = _usage(usage)
        counts, estimated = self._row_tokens(positions, total, input_tokens)
        answers = [
            RowAnswer(
                {
                    **answer,
                    "data": [{**item, "index": 0}],
                    "usage": {name: count for name in usage_names},
                },
                count,
                estimated,
            )
            for item, count in zip(data, counts, strict=True)
        ]
        return FreshRows(answers)

    def _row_tokens(self, positions: Sequence[int], total: int, header: str | None) -> tuple[list[int], bool]:
        """Each row's prompt tokens and whether they are estimates.

        Exact from the upstream's `X-Input-Tokens` header, from token ids themselves, or by subtraction
        when one row's count is unknown; otherwise the rows whose count is unknown share what is left of
        the total in proportion to their length (`apportion`), so that the counts always add up to the
        upstream's total and a later answer merged from them says `X-Cache-Usage: estimated`.
        """
        from_header = _parse_counts(header, len(positions))
        if from_header is not None and sum(from_header) == total:
            return list(from_header), False
        known = [self.rows[position].tokens for position in positions]
        unknown = [index for index, count in enumerate(known) if count is None]
        known_sum = sum(count for count in known if count is not None)
        if not unknown and known_sum == total:
            return [count or 0 for count in known], False
        if len(unknown) == 1 and total - known_sum >= 0:
            counts = [count or 0 for count in known]
            counts[unknown[0]] = total - known_sum
            return counts, False
        if not unknown:  # the upstream counts token ids otherwise: share the total by length
            unknown, known_sum = list(range(len(positions))), 0
        weights = [_length(self.rows[positions[index]].content) for index in unknown]
        counts = [count or 0 for count in known]
        for index, share in zip(unknown, apportion(max(total - known_sum, 0), weights), strict=True):
            counts[index] = share
        return counts, True

    def load_answer(
        self, content: bytes, estimated: bool = False, tokens: int | None = None
    ) -> RowAnswer | None:
        if tokens is not None:  # a row this proxy stored: read it only when rows are put together
            return RowAnswer(None, tokens, estimated, content)
        try:
            document = _load_object(content)
            tokens, _ = _usage(document.get("usage"))
        except AnswerMismatch:
            return None
        data = document.get("data")
        if not isinstance(data, list) or len(data) != 1 or not isinstance(data[0], dict):
            return None
        return RowAnswer(document, tokens, estimated, content)

    def merge(self, answers: Sequence[RowAnswer]) -> bytes:
        if len(answers) != len(self.rows):
            raise ValueError(f"{len(answers)} answers for {len(self.rows)} rows")
        if len(answers) == 1 and answers[0].raw is not None:
            return answers[0].raw  # a stored row is the answer to itself alone: its bytes as stored
        documents = [_document_of(answer) for answer in answers]
        tokens = sum(answer.tokens or 0 for answer in answers)
        first = documents[0]
        assert first is not None
        return dump(
            {
                **first,
                "data": [
                    {**document["data"][0], "index": index}
                    for index, document in enumerate(documents)
                    if document
                ],
                "usage": {name: tokens for name in first["usage"]},
            }
        )


def apportion(total: int, weights: Sequence[int]) -> list[int]:
    """`total` split in proportion to `weights` (largest remainder), adding up to `total` exactly.

    >>> apportion(10, [1, 1, 2]), apportion(3, [0, 0]), apportion(0, [5])
    ([3, 2, 5], [2, 1], [0])
    """
    if not weights:
        return []
    weight_sum = sum(weights)
    if weight_sum <= 0:
        weights, weight_sum = [1] * len(weights), len(weights)
    shares = [total * weight // weight_sum for weight in weights]
    remainders = sorted(
        range(len(weights)), key=lambda index: (-(total * weights[index] % weight_sum), index)
    )
    for index in remainders[: total - sum(shares)]:
        shares[index] += 1
    return shares


def _length(content: Any) -> int:
    return len(content) if isinstance(content, str | list) else 1


def _document_of(answer: RowAnswer) -> JsonObject:
    """A row answer's JSON document, read from its stored bytes when it came from the store."""
    if answer.document is not None:
        return answer.document
    if answer.raw is None:
        raise ValueError("a row answer has neither a document nor bytes")
    try:
        return _load_object(answer.raw)
    except AnswerMismatch as exc:
        raise ValueError(str(exc)) from None


def _count(value: Any) -> int | str:
    return len(value) if isinstance(value, list) else "no list of"


def _usage(usage: Any) -> tuple[int, list[str]]:
    """The prompt tokens of an OpenAI `usage` and its field names; every field must be that same count."""
    if not isinstance(usage, dict) or not _is_int(usage.get("prompt_tokens")):
        raise AnswerMismatch("the answer has no usage.prompt_tokens")
    total: int = usage["prompt_tokens"]
    if any(value != total for value in usage.values()):
        raise AnswerMismatch(f"the answer's usage {usage} cannot be split by row")
    return total, list(usage)


def _parse_counts(header: str | None, expected: int) -> list[int] | None:
    if not header:
        return None
    try:
        counts = [int(part) for part in header.split(",")]
    except ValueError:
        return None
    return counts if len(counts) == expected and all(count >= 0 for count in counts) else None


# KServe v2 --------------------------------------------------------------------------------------------


def flatten(data: Any) -> list[Any]:
    """Row-major elements of flat or nested JSON lists (the protocol allows both)."""
    if not isinstance(data, list):
        return [data]
    if not any(isinstance(item, list) for item in data):
        return data
    return [element for item in data for element in flatten(item)]


def _uses_binary(value: Any) -> bool:
    """Whether any `parameters` asks for the binary tensor extension (the answer would not be JSON)."""
    if isinstance(value, list):
        return any(_uses_binary(item) for item in value)
    if not isinstance(value, dict):
        return False
    parameters = value.get("parameters")
    if isinstance(parameters, dict) and any(str(name).startswith("binary_data") for name in parameters):
        return True
    return any(_uses_binary(inner) for name, inner in value.items() if name not in ("data", "parameters"))


@dataclass(frozen=True)
class _Tensor:
    description: JsonObject  # the input as sent, without `shape` and `data`
    row_shape: list[int]
    flat: list[Any]

    @property
    def row_size(self) -> int:
        return math.prod(self.row_shape)


def _tensor(value: Any) -> tuple[_Tensor, int] | None:
    """An input tensor and its batch size, or None when it is not a well-formed JSON tensor."""
    if not isinstance(value, dict) or not isinstance(value.get("name"), str) or "data" not in value:
        return None
    shape = value.get("shape")
    if not isinstance(shape, list) or not shape or not all(_is_int(size) and size >= 0 for size in shape):
        return None
    flat = flatten(value["data"])
    if not isinstance(value["data"], list) or len(flat) != math.prod(shape):
        return None
    description = {name: inner for name, inner in value.items() if name not in ("shape", "data")}
    return _Tensor(description, shape[1:], flat), shape[0]


def split_inference(document: Any, ignore_fields: Sequence[str] = ()) -> InferenceBatch | None:
    """The rows of a KServe v2 inference request to a batching model, or None when it is not a JSON batch.

    >>> batch = split_inference({"inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 2],
    ...                                      "data": [[1, 2], [3, 4]]}]})
    >>> [row.content for row in batch.rows]
    [([1, 2],), ([3, 4],)]
    """
    if not isinstance(document, dict) or _uses_binary(document):
        return None
    inputs = document.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        return None
    tensors = []
    sizes = set()
    for value in inputs:
        parsed = _tensor(value)
        if parsed is None:
            return None
        tensors.append(parsed[0])
        sizes.add(parsed[1])
    names = [tensor.description["name"] for tensor in tensors]
    if len(sizes) != 1 or len(set(names)) != len(names):
        return None
    size = sizes.pop()
    if size == 0:
        return None
    rest = drop_fields(
        {name: value for name, value in document.items() if name not in ("inputs", "id")}, ignore_fields
    )
    order = sorted(range(len(tensors)), key=lambda index: names[index])
    contents = [
        tuple(tensor.flat[row * tensor.row_size : (row + 1) * tensor.row_size] for tensor in tensors)
        for row in range(size)
    ]
    prefix = b"kserve-v2-infer\n" + canonical_json(rest) + b"\n"
    rows = [
        Row(
            prefix
            + canonical_json(
                [
                    {**tensors[index].description, "shape": tensors[index].row_shape, "data": content[index]}
                    for index in order
                ]
            ),
            content,
        )
        for content in contents
    ]
    return InferenceBatch(document, rows, tensors)


class InferenceBatch(Batch):
    protocol: Protocol = "kserve-v2-infer"

    def __init__(self, document: JsonObject, rows: Sequence[Row], tensors: Sequence[_Tensor]) -> None:
        super().__init__(document, rows)
        self._tensors = tuple(tensors)
        self._inputs: list[JsonObject] = document["inputs"]

    def request_body(self, positions: Sequence[int]) -> bytes:
        inputs = [
            {
                **given,
                "shape": [len(positions), *tensor.row_shape],
                "data": [element for position in positions for element in self.rows[position].content[index]],
            }
            for index, (given, tensor) in enumerate(zip(self._inputs, self._tensors, strict=True))
        ]
        return dump({name: inputs if name == "inputs" else value for name, value in self.document.items()})

    def fresh_answers(
        self, positions: Sequence[int], body: bytes, input_tokens: str | None = None
    ) -> FreshRows:
        answer = _load_object(body)
        outputs = answer.get("outputs")
        if not isinstance(outputs, list) or not outputs:
            raise AnswerMismatch("the answer has no outputs")
        count = len(positions)
        split = []
        for output in outputs:
            shape = output.get("shape") if isinstance(output, dict) else None
            if not isinstance(shape, list) or not shape or shape[0] != count:
                raise AnswerMismatch(f"an output's shape {shape} does not have {count} rows")
            flat = flatten(output.get("data"))
            if len(flat) != math.prod(shape):
                raise AnswerMismatch(f"an output's data does not fill its shape {shape}")
            split.append((output, shape[1:], math.prod(shape[1:]), flat))
        return FreshRows(
            [
                RowAnswer(
                    {
                        **answer,
                        "outputs": [
                            {**output, "shape": [1, *row_shape], "data": flat[row * size : (row + 1) * size]}
                            for output, row_shape, size, flat in split
                        ],
                    },
                    0,
                )
                for row in range(count)
            ]
        )

    def load_answer(
        self, content: bytes, estimated: bool = False, tokens: int | None = None
    ) -> RowAnswer | None:
        try:
            document = _load_object(content)
        except AnswerMismatch:
            return None
        outputs = document.get("outputs")
        if not isinstance(outputs, list) or not outputs:
            return None
        for output in outputs:
            shape = output.get("shape") if isinstance(output, dict) else None
            if not isinstance(shape, list) or not shape or shape[0] != 1:
                return None
            if not isinstance(output.get("data"), list) or len(output["data"]) != math.prod(shape):
                return None
        return RowAnswer(document, 0, raw=content)

    def merge(self, answers: Sequence[RowAnswer]) -> bytes:
        if len(answers) != len(self.rows):
            raise ValueError(f"{len(answers)} answers for {len(self.rows)} rows")
        documents = [_document_of(answer) for answer in answers]
        first = documents[0]
        layout = _layout(first)
        if any(_layout(document) != layout for document in documents if document is not None):
            raise ValueError("the row answers disagree on their outputs (names, datatypes or shapes)")
        merged: JsonObject = {
            **first,
            "outputs": [
                {
                    **output,
                    "shape": [len(answers), *output["shape"][1:]],
                    "data": [
                        element
                        for document in documents
                        if document is not None
                        for element in document["outputs"][index]["data"]
                    ],
                }
                for index, output in enumerate(first["outputs"])
            ],
        }
        if "id" in self.document or "id" in merged:
            merged["id"] = self.document.get("id")  # the model echoes the request's id (null when absent)
        return dump(merged)


def _layout(document: JsonObject) -> list[tuple[Any, ...]]:
    return [
        (output.get("name"), output.get("datatype"), output["shape"][1:]) for output in document["outputs"]
    ]


# A whole request ---------------------------------------------------------------------------------------


class WholeRequest(Batch):
    """Any request the cache handles that is not split into rows: one row, the request itself, whose
    answer is the upstream's answer as it came (status, headers and bytes; nothing is parsed).

    >>> whole = WholeRequest(b"json:{}")
    >>> whole.merge([whole.load_answer(b"answer")])
    b'answer'
    """

    protocol: Protocol = "whole"

    def __init__(self, key: bytes) -> None:
        super().__init__({}, [Row(key, None)])

    def request_body(self, positions: Sequence[int]) -> bytes:
        raise NotImplementedError("a whole request is always sent as the client sent it")

    def fresh_answers(
        self, positions: Sequence[int], body: bytes, input_tokens: str | None = None
    ) -> FreshRows:
        return FreshRows([RowAnswer(None, 0, raw=body)])

    def load_answer(
        self, content: bytes, estimated: bool = False, tokens: int | None = None
    ) -> RowAnswer | None:
        return RowAnswer(None, 0, raw=content)

    def merge(self, answers: Sequence[RowAnswer]) -> bytes:
        if len(answers) != 1:
            raise ValueError(f"{len(answers)} answers for a whole request")
        return answers[0].body()
