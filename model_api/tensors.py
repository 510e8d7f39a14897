"""Tensors as the Open Inference Protocol (KServe v2) writes them, in JSON or as raw bytes, checked
against a model's specs.

Pure code (numpy only): a `TensorSpec` says what a model expects (`-1` for a dimension of any size); the
functions here turn a request's `{"name", "datatype", "shape", "data"}` (`decode_tensor`) or its raw
bytes (`decode_binary_tensor`, the binary tensor data extension) into a numpy array, or raise a
`TensorError` whose message names the expected datatype or shape; `encode_tensor` and
`encode_binary_tensor` do the reverse for outputs.

Raw bytes are as Triton and KServe lay them out: the elements in row-major order, little-endian, each of
the datatype's size (BOOL: one byte, 0 or 1; BF16: the upper two bytes of the float32); a BYTES element
is a 4-byte little-endian length followed by that many bytes.

>>> spec = TensorSpec("pixels", "FP32", (-1, 2))
>>> decode_tensor(spec, "FP32", [2, 2], [[1, 2], [3, 4]]).tolist()
[[1.0, 2.0], [3.0, 4.0]]
>>> decode_tensor(spec, "FP32", [1, 3], [1, 2, 3])
Traceback (most recent call last):
...
model_api.tensors.TensorError: input 'pixels' has shape [1, 3]; expected [-1, 2] (-1: any size)
>>> encode_binary_tensor("BYTES", np.array(["hi", "there"], dtype=object))
b'\\x02\\x00\\x00\\x00hi\\x05\\x00\\x00\\x00there'
>>> decode_binary_tensor(spec, "FP32", [1, 2], np.array([1, 2], "<f4").tobytes()).tolist()
[[1.0, 2.0]]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

# KServe v2 datatypes and the numpy dtype their JSON data is read into. BF16 has no numpy dtype: it
# travels as FP32 and the model converts it.
NUMPY_DTYPES: dict[str, Any] = {
    "BOOL": np.bool_,
    "UINT8": np.uint8,
    "UINT16": np.uint16,
    "UINT32": np.uint32,
    "UINT64": np.uint64,
    "INT8": np.int8,
    "INT16": np.int16,
    "INT32": np.int32,
    "INT64": np.int64,
    "FP16": np.float16,
    "FP32": np.float32,
    "FP64": np.float64,
    "BF16": np.float32,
    "BYTES": np.object_,
}


@dataclass(frozen=True)
class TensorSpec:
    """A named input or output of a model: KServe datatype and shape (-1 where any size fits)."""

    name: str
    datatype: str
    shape: tuple[int, ...]

    def metadata(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}


class TensorError(ValueError):
    """A tensor in a request does not fit the model; `code` and `expected` say how."""

    def __init__(self, code: str, message: str, expected: Any = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.expected = expected


def shape_fits(shape: tuple[int, ...], expected: tuple[int, ...]) -> bool:
    if len(shape) != len(expected):
        return False
    return all(want == -1 or got == want for got, want in zip(shape, expected, strict=True))


def _flatten(data: Any) -> list[Any]:
    """Row-major elements of flat or nested JSON lists (the protocol allows both)."""
    if not isinstance(data, list):
        return [data]
    if not any(isinstance(item, list) for item in data):
        return data
    flat: list[Any] = []
    stack: list[Any] = [iter(data)]
    while stack:
        item = next(stack[-1], _END)
        if item is _END:
            stack.pop()
        elif isinstance(item, list):
            stack.append(iter(item))
        else:
            flat.append(item)
    return flat


_END = object()


def _check_values(name: str, datatype: str, values: list[Any]) -> None:
    """JSON numbers for number tensors, booleans for BOOL, strings for BYTES; nothing else."""
    if datatype == "BYTES":
        ok = all(isinstance(value, str) for value in values)
        kind = "strings"
    elif datatype == "BOOL":
        ok = all(isinstance(value, bool) for value in values)
        kind = "true/false"
    elif datatype.startswith(("INT", "UINT")):
        ok = all(isinstance(value, int) and not isinstance(value, bool) for value in values)
        kind = "integers"
    else:
        ok = all(isinstance(value, int | float) and not isinstance(value, bool) for value in values)
        kind = "numbers"
    if not ok:
        raise TensorError(
            "invalid_tensor_data", f"input '{name}' is {datatype}: its data must be {kind}", expected=datatype
        )


def _check_header(spec: TensorSpec, datatype: str, shape: list[int]) -> int:
    """The element count of an input whose datatype and shape fit `spec`."""
    if datatype != spec.datatype:
        raise TensorError(
            "wrong_datatype",
            f"input '{spec.name}' has datatype {datatype}; expected {spec.datatype}",
            expected=spec.datatype,
        )
    if any(not isinstance(size, int) or size < 0 for size in shape):
        raise TensorError("wrong_shape", f"input '{spec.name}' has an invalid shape {shape}")
    if not shape_fits(tuple(shape), spec.shape):
        raise TensorError(
            "wrong_shape",
            f"input '{spec.name}' has shape {list(shape)}; expected {list(spec.shape)} (-1: any size)",
            expected=list(spec.shape),
        )
    return int(np.prod(shape)) if shape else 1


def decode_tensor(spec: TensorSpec, datatype: str, shape: list[int], data: Any) -> np.ndarray:
    """The array a request's input describes in JSON, checked against `spec`."""
    count = _check_header(spec, datatype, shape)
    values = _flatten(data)
    if len(values) != count:
        raise TensorError(
            "wrong_shape",
            f"input '{spec.name}' declares shape {list(shape)} ({count} elements) but its data holds "
            f"{len(values)}",
            expected=list(spec.shape),
        )
    _check_values(spec.name, datatype, values)
    dtype = NUMPY_DTYPES[datatype]
    if datatype.startswith(("INT", "UINT")) and values:
        limits = np.iinfo(dtype)
        if min(values) < limits.min or max(values) > limits.max:
            raise TensorError(
                "invalid_tensor_data",
                f"input '{spec.name}' holds values outside {datatype}'s range [{limits.min}, {limits.max}]",
                expected=datatype,
            )
    array = np.empty(count, dtype=object) if datatype == "BYTES" else None
    if array is not None:
        array[:] = values
    else:
        array = np.asarray(values, dtype=dtype)
    return array.reshape(shape)


def datatype_of(array: np.ndarray) -> str:
    """The KServe datatype of an array a model returned."""
    if array.dtype == np.object_:
        return "BYTES"
    for datatype, dtype in NUMPY_DTYPES.items():
        if datatype != "BF16" and array.dtype == dtype:
            return datatype
    raise TypeError(f"no KServe datatype for numpy {array.dtype}")


def encode_tensor(name: str, datatype: str, array: np.ndarray) -> dict[str, Any]:
    """A response output: shape and row-major flat data."""
    return {
        "name": name,
        "datatype": datatype,
        "shape": list(array.shape),
        "data": array.reshape(-1).tolist(),
    }


# The binary tensor data extension ----------------------------------------------------------------------

BINARY_HEADER = "Inference-Header-Content-Length"  # bytes of JSON before the raw tensors, both directions
_LENGTH = np.dtype("<u4")  # the prefix of each BYTES element


def _little_endian(datatype: str) -> np.dtype[Any]:
    return np.dtype(NUMPY_DTYPES[datatype]).newbyteorder("<")


def _unpack_bytes(name: str, raw: bytes, count: int) -> list[bytes]:
    items: list[bytes] = []
    offset = 0
    while offset < len(raw):
        if offset + _LENGTH.itemsize > len(raw):
            break
        length = int(np.frombuffer(raw, _LENGTH, count=1, offset=offset)[0])
        offset += _LENGTH.itemsize
        if offset + length > len(raw):
            raise TensorError(
                "invalid_tensor_data",
                f"input '{name}' is BYTES: element {len(items)} declares {length} bytes but only "
                f"{len(raw) - offset} remain",
                expected="BYTES",
            )
        items.append(raw[offset : offset + length])
        offset += length
    if offset != len(raw) or len(items) != count:
        raise TensorError(
            "wrong_shape",
            f"input '{name}' declares {count} elements but its {len(raw)} bytes hold "
            f"{len(items)} length-prefixed elements"
            + (f" and {len(raw) - offset} stray bytes" if offset != len(raw) else ""),
        )
    return items


def decode_binary_tensor(spec: TensorSpec, datatype: str, shape: list[int], raw: bytes) -> np.ndarray:
    """The array an input sent as raw bytes (its `binary_data_size` bytes after the JSON) describes."""
    count = _check_header(spec, datatype, shape)
    if datatype == "BYTES":
        array = np.empty(count, dtype=object)
        try:
            array[:] = [item.decode("utf-8") for item in _unpack_bytes(spec.name, raw, count)]
        except UnicodeDecodeError as error:
            raise TensorError(
                "invalid_tensor_data", f"input '{spec.name}' holds text that is not UTF-8 ({error})"
            ) from error
        return array.reshape(shape)
    wire = np.dtype("<u2") if datatype == "BF16" else _little_endian(datatype)
    if len(raw) != count * wire.itemsize:
        raise TensorError(
            "wrong_shape",
            f"input '{spec.name}' declares shape {list(shape)} ({count} {datatype} elements, "
            f"{count * wire.itemsize} bytes) but its binary data has {len(raw)} bytes",
            expected=list(spec.shape),
        )
    values = np.frombuffer(raw, dtype=wire)
    if datatype == "BF16":  # bfloat16 is the upper half of a float32
        values = (values.astype("<u4") << 16).view("<f4")
    elif datatype == "BOOL":
        values = np.frombuffer(raw, dtype=np.uint8) != 0
    return values.astype(NUMPY_DTYPES[datatype], copy=False).reshape(shape)


def encode_binary_tensor(datatype: str, array: np.ndarray) -> bytes:
    """An output's raw bytes: row-major, little-endian; BYTES elements each with a 4-byte length."""
    if datatype == "BF16":  # the upper half of each float32 (exact for values computed in bfloat16)
        return (np.ascontiguousarray(array, dtype="<f4").view("<u4") >> 16).astype("<u2").tobytes()
    if datatype != "BYTES":
        return np.ascontiguousarray(array, dtype=_little_endian(datatype)).tobytes()
    items = [item if isinstance(item, bytes) else str(item).encode("utf-8") for item in array.reshape(-1)]
    lengths = np.fromiter((len(item) for item in items), dtype=_LENGTH, count=len(items))
    return b"".join(
        part for length, item in zip(lengths, items, strict=True) for part in (length.tobytes(), item)
    )
