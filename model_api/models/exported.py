"""Tensor models from exported PyTorch programs: torch.export `.pt2` files and TorchScript `.pt` files.

Inputs and outputs (names, KServe datatypes, shapes with -1 for dynamic dimensions) come from the file:

- a `.pt2` program records them in its graph (a dimension exported as `torch.export.Dim` is dynamic);
- a TorchScript file does not record shapes, so it must carry them in an extra file named
  `model_api.json` (`torch.jit.save(module, path, _extra_files={"model_api.json": ...})`).

In both formats `model_api.json`, when present, names the tensors:

    {"inputs":  [{"name": "pixels", "datatype": "FP32", "shape": [-1, 64]}],
     "outputs": [{"name": "logits", "datatype": "FP32", "shape": [-1, 10]}, ...]}

A model is batchable (rows of different requests may share a forward pass) when the first dimension of
every input and output is dynamic and no other input dimension is.
"""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch.utils import _pytree

from model_api.models.digest import tensors_digest
from model_api.tensors import NUMPY_DTYPES, TensorSpec

logger = logging.getLogger(__name__)

SIGNATURE_FILE = "model_api.json"
EXPORTED_SUFFIXES = (".pt2",)
TORCHSCRIPT_SUFFIXES = (".pt", ".pth", ".torchscript")

TORCH_TO_KSERVE = {
    torch.bool: "BOOL",
    torch.uint8: "UINT8",
    torch.int8: "INT8",
    torch.int16: "INT16",
    torch.int32: "INT32",
    torch.int64: "INT64",
    torch.float16: "FP16",
    torch.bfloat16: "BF16",
    torch.float32: "FP32",
    torch.float64: "FP64",
}
KSERVE_TO_TORCH = {name: dtype for dtype, name in TORCH_TO_KSERVE.items()}


class ModelFileError(ValueError):
    """The file cannot be served; the message says what is missing."""


def _specs(entries: Any, what: str, source: Path) -> tuple[TensorSpec, ...]:
    try:
        specs = tuple(
            TensorSpec(
                str(entry["name"]), str(entry["datatype"]), tuple(int(size) for size in entry["shape"])
            )
            for entry in entries
        )
    except (TypeError, KeyError, ValueError) as error:
        raise ModelFileError(
            f"{source}: {SIGNATURE_FILE} must list {what} as {{name, datatype, shape}} objects ({error})"
        ) from error
    for spec in specs:
        if spec.datatype not in KSERVE_TO_TORCH:
            raise ModelFileError(
                f"{source}: {what} '{spec.name}' has datatype {spec.datatype}; "
                f"supported: {', '.join(KSERVE_TO_TORCH)}"
            )
    return specs


def _fake_spec(name: str, value: Any) -> TensorSpec:
    shape = tuple(size if isinstance(size, int) else -1 for size in value.shape)
    return TensorSpec(name, TORCH_TO_KSERVE.get(value.dtype, str(value.dtype)), shape)


def _signature_of_program(
    program: Any, source: Path
) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    """Inputs and outputs recorded in a torch.export program's graph."""
    user_inputs = set(program.graph_signature.user_inputs)
    placeholders = [node for node in program.graph.nodes if node.op == "placeholder"]
    inputs = tuple(
        _fake_spec(node.name, node.meta["val"]) for node in placeholders if node.name in user_inputs
    )
    output_node = next(node for node in program.graph.nodes if node.op == "output")
    returned = output_node.args[0]
    user_outputs = len(program.graph_signature.user_outputs)
    values = list(returned)[-user_outputs:] if user_outputs else []
    outputs = tuple(
        _fake_spec(getattr(node, "name", f"output_{i}"), node.meta["val"]) for i, node in enumerate(values)
    )
    if not inputs or not outputs:
        raise ModelFileError(f"{source}: the program has no tensor inputs or outputs")
    return inputs, outputs


def _named(
    recorded: tuple[TensorSpec, ...], declared: tuple[TensorSpec, ...] | None, what: str, source: Path
) -> tuple[TensorSpec, ...]:
    """The recorded specs, under the names `model_api.json` gives them."""
    if declared is None:
        return recorded
    if len(declared) != len(recorded):
        raise ModelFileError(
            f"{source}: {SIGNATURE_FILE} lists {len(declared)} {what} but the program has {len(recorded)}"
        )
    return tuple(
        TensorSpec(name.name, spec.datatype, spec.shape)
        for name, spec in zip(declared, recorded, strict=True)
    )


def _is_batchable(inputs: tuple[TensorSpec, ...], outputs: tuple[TensorSpec, ...]) -> bool:
    leading = all(spec.shape and spec.shape[0] == -1 for spec in (*inputs, *outputs))
    fixed_rest = all(-1 not in spec.shape[1:] for spec in inputs)
    return leading and fixed_rest


class ExportedModel:
    """A torch.export or TorchScript program served as a tensor model."""

    kind: Literal["tensor"] = "tensor"

    def __init__(self, name: str, source: Path, device: str) -> None:
        self.name = name
        self.device = torch.device(device)
        extra = {SIGNATURE_FILE: ""}
        declared_inputs: tuple[TensorSpec, ...] | None = None
        declared_outputs: tuple[TensorSpec, ...] | None = None
        if source.suffix in EXPORTED_SUFFIXES:
            program = torch.export.load(str(source), extra_files=extra)
            self.platform = "pytorch_torch_export"
            self._module: Any = program.module().to(self.device)
        elif source.suffix in TORCHSCRIPT_SUFFIXES:
            with warnings.catch_warnings():  # torch.jit is deprecated, yet its files are still served
                warnings.simplefilter("ignore", DeprecationWarning)
                self._module = torch.jit.load(str(source), map_location=self.device, _extra_files=extra)
            self._module.eval()
            self.platform = "pytorch_libtorch"
        else:
            raise ModelFileError(f"{source}: not a .pt2 (torch.export) or .pt (TorchScript) file")
        declared: dict[str, Any] = {}
        if extra[SIGNATURE_FILE]:
            try:
                declared = json.loads(extra[SIGNATURE_FILE])
            except json.JSONDecodeError as error:
                raise ModelFileError(f"{source}: {SIGNATURE_FILE} is not valid JSON ({error})") from error
            declared_inputs = _specs(declared.get("inputs", []), "inputs", source)
            declared_outputs = _specs(declared.get("outputs", []), "outputs", source)
        if self.platform == "pytorch_torch_export":
            recorded_inputs, recorded_outputs = _signature_of_program(program, source)
            self.inputs = _named(recorded_inputs, declared_inputs, "inputs", source)
            self.outputs = _named(recorded_outputs, declared_outputs, "outputs", source)
        elif declared_inputs and declared_outputs:
            self.inputs, self.outputs = declared_inputs, declared_outputs
        else:
            raise ModelFileError(
                f"{source}: a TorchScript file records no tensor shapes; save it with an extra file "
                f"'{SIGNATURE_FILE}' listing inputs and outputs (see docs/model-api.md)"
            )
        self.batchable = _is_batchable(self.inputs, self.outputs)
        weights = (
            dict(program.state_dict) | dict(program.constants)
            if self.platform == "pytorch_torch_export"
            else self._module.state_dict()
        )
        signature = json.dumps(
            [[spec.metadata() for spec in self.inputs], [spec.metadata() for spec in self.outputs]]
        )
        self.digest = tensors_digest(
            {name: value for name, value in weights.items() if isinstance(value, torch.Tensor)},
            extra=[self.platform.encode(), signature.encode()],
        )
        self._warm_up()

    def _warm_up(self) -> None:
        """One pass on zeros (size 1 for dynamic dimensions), so that the first client does not pay for it."""
        zeros = [
            np.zeros([1 if size == -1 else size for size in spec.shape], dtype=NUMPY_DTYPES[spec.datatype])
            for spec in self.inputs
        ]
        try:
            self._forward(zeros)
        except Exception as error:  # a program may refuse zeros or size 1; then the first request warms it
            logger.debug("%s: no warm-up pass (%s)", self.name, error)

    def _forward(self, arrays: list[np.ndarray]) -> list[np.ndarray]:
        tensors = [
            torch.from_numpy(np.ascontiguousarray(array)).to(self.device, KSERVE_TO_TORCH[spec.datatype])
            for spec, array in zip(self.inputs, arrays, strict=True)
        ]
        with torch.inference_mode():
            returned = self._module(*tensors)
        leaves = [leaf for leaf in _pytree.tree_leaves(returned) if isinstance(leaf, torch.Tensor)]
        if len(leaves) != len(self.outputs):
            raise RuntimeError(
                f"the program returned {len(leaves)} tensors; its signature lists {len(self.outputs)}"
            )
        # numpy has no bfloat16: such outputs leave as FP32 values.
        return [(leaf.float() if leaf.dtype == torch.bfloat16 else leaf).cpu().numpy() for leaf in leaves]

    def run_batch(self, rows: list[Any]) -> list[dict[str, np.ndarray]]:
        """Batchable: each row maps input names to one row's arrays. Otherwise: each row is a request."""
        names = [spec.name for spec in self.outputs]
        if not self.batchable:
            return [
                dict(zip(names, self._forward([row[spec.name] for spec in self.inputs]), strict=True))
                for row in rows
            ]
        stacked = [np.stack([row[spec.name] for row in rows]) for spec in self.inputs]
        outputs = self._forward(stacked)
        return [
            {name: output[index] for name, output in zip(names, outputs, strict=True)}
            for index in range(len(rows))
        ]
