"""Classify rows with a tensor model through the Open Inference Protocol (KServe v2).

The request is built from the model's own metadata (`GET /v2/models/{name}`): the input's name, its
datatype and its shape, whose leading dimension is the batch. The answer's first output is read as
class scores (one row of scores per input row: the class is the arg-max) or as class ids.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from client_app.client import ClientError, InputError, ModelApiClient, ModelMetadata, Reply, TensorSpec

SAMPLES_FILE = "digits.json"

FLOAT_TYPES = {"FP16", "BF16", "FP32", "FP64"}
INT_TYPES = {"INT8", "INT16", "INT32", "INT64", "UINT8", "UINT16", "UINT32", "UINT64"}


@dataclass(frozen=True)
class Sample:
    label: int | None
    pixels: list[float]


@dataclass(frozen=True)
class Prediction:
    row: int
    label: int | None  # the known answer for a built-in sample
    predicted: int
    confidence: float | None  # probability of the predicted class, when the output holds scores


@dataclass(frozen=True)
class PredictResult:
    model: str
    input: TensorSpec
    output: TensorSpec
    predictions: list[Prediction]
    reply: Reply


def builtin_samples(count: int) -> list[Sample]:
    """The first `count` of the 20 shipped 8x8 digits (scikit-learn's `load_digits`, grey levels 0-16)."""
    data = json.loads(
        resources.files("client_app").joinpath("data", SAMPLES_FILE).read_text(encoding="utf-8")
    )
    samples = [Sample(int(item["label"]), [float(v) for v in item["pixels"]]) for item in data["samples"]]
    if not 1 <= count <= len(samples):
        raise InputError(f"--sample takes 1 to {len(samples)} (the built-in digits), not {count}")
    return samples[:count]


def parse_rows(text: str) -> list[Sample]:
    """`--input`: a JSON list of numbers (one row), a list of rows, or `@FILE` holding either."""
    if text.startswith("@"):
        try:
            text = Path(text[1:]).read_text(encoding="utf-8")
        except OSError as exc:
            raise InputError(f"cannot read {text[1:]}: {exc.strerror or exc}") from None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(f"--input is not valid JSON: {exc}") from None
    if isinstance(value, list) and value and all(_is_number(v) for v in value):
        value = [value]
    if (
        not isinstance(value, list)
        or not value
        or not all(isinstance(row, list) and row and all(_is_number(v) for v in row) for row in value)
    ):
        raise InputError("--input must be a JSON list of numbers or a list of such rows")
    if len({len(row) for row in value}) != 1:
        raise InputError("--input rows must all have the same length")
    return [Sample(None, [float(v) for v in row]) for row in value]


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def tensor_shape(spec: TensorSpec, rows: int, row_size: int) -> list[int]:
    """The concrete shape for `rows` rows of `row_size` values, from a declared shape such as [-1, 64]."""
    if not spec.shape:
        raise ClientError(f"input {spec.name!r} declares an empty shape; cannot send rows to it")
    batch, *rest = spec.shape
    if batch not in (-1, rows):
        raise InputError(
            f"input {spec.name!r} takes a fixed batch of {batch} rows (shape {spec.shape}), not {rows}"
        )
    known = math.prod(d for d in rest if d >= 0)
    unknown = [position for position, d in enumerate(rest) if d < 0]
    if len(unknown) == 1 and known and row_size % known == 0:
        rest[unknown[0]] = row_size // known
    if any(d < 0 for d in rest) or math.prod(rest) != row_size:
        raise InputError(f"input {spec.name!r} of shape {spec.shape} cannot hold rows of {row_size} values")
    return [rows, *rest]


def infer_inputs(spec: TensorSpec, rows: Sequence[Sequence[float]]) -> list[dict[str, Any]]:
    """The KServe v2 `inputs` list: one tensor, data flattened in row-major order."""
    datatype = spec.datatype.upper()
    values = [v for row in rows for v in row]
    data: list[Any]
    if datatype in FLOAT_TYPES:
        data = [float(v) for v in values]
    elif datatype in INT_TYPES:
        data = [round(v) for v in values]
    elif datatype == "BOOL":
        data = [bool(v) for v in values]
    else:
        raise ClientError(f"input {spec.name!r} has datatype {spec.datatype}, which this client cannot send")
    shape = tensor_shape(spec, len(rows), len(rows[0]))
    return [{"name": spec.name, "shape": shape, "datatype": spec.datatype, "data": data}]


def read_classes(output: dict[str, Any], rows: int) -> list[tuple[int, float | None]]:
    """(class, confidence) per row from an output holding class ids or a row of scores per input row."""
    data = output.get("data")
    name = output.get("name", "?")
    if not isinstance(data, list) or not data:
        raise ClientError(f"output {name!r} holds no data")
    flat = _flatten(data)
    if len(flat) == rows:  # one value per row: class ids
        return [(round(v), None) for v in flat]
    if len(flat) % rows:
        raise ClientError(
            f"output {name!r} has {len(flat)} values, not a whole number per row for {rows} rows"
        )
    width = len(flat) // rows
    answers: list[tuple[int, float | None]] = []
    for row in range(rows):
        scores = flat[row * width : (row + 1) * width]
        best = max(range(width), key=scores.__getitem__)
        answers.append((best, _probabilities(scores)[best]))
    return answers


def _flatten(data: list[Any]) -> list[float]:
    flat: list[float] = []
    for item in data:
        if isinstance(item, list):
            flat.extend(_flatten(item))
        elif _is_number(item):
            flat.append(float(item))
        else:
            raise ClientError(f"output data holds {item!r}, not a number")
    return flat


def _probabilities(scores: Sequence[float]) -> list[float]:
    """Scores that already are probabilities stay as they are; anything else (logits) gets a softmax."""
    if all(0.0 <= s <= 1.0 for s in scores) and abs(sum(scores) - 1.0) < 1e-3:
        return list(scores)
    top = max(scores)
    exps = [math.exp(s - top) for s in scores]
    total = sum(exps)
    return [e / total for e in exps]


def predict(client: ModelApiClient, model: str, samples: Sequence[Sample]) -> PredictResult:
    metadata: ModelMetadata = client.model_metadata(model)
    spec = metadata.inputs[0]
    if len(metadata.inputs) > 1:
        names = ", ".join(item.name for item in metadata.inputs)
        raise ClientError(
            f"model {model!r} takes {len(metadata.inputs)} inputs ({names}); this client sends one"
        )
    reply = client.infer(model, infer_inputs(spec, [sample.pixels for sample in samples]))
    output = reply.body["outputs"][0]
    classes = read_classes(output, len(samples))
    predictions = [
        Prediction(row, sample.label, predicted, confidence)
        for row, (sample, (predicted, confidence)) in enumerate(zip(samples, classes, strict=True))
    ]
    output_spec = TensorSpec(
        str(output.get("name", "?")), str(output.get("datatype", "?")), list(output.get("shape", []))
    )
    return PredictResult(metadata.name, spec, output_spec, predictions, reply)
