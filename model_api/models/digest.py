"""Digests of model weights: the same weights give the same digest in every process, on every device.

A model's digest covers its tensors (name, dtype, shape and bytes, in name order) and whatever else
changes its answers (a signature, a tokenizer's files), given as `extra`. The deployment version that
every response carries is a digest of all loaded models' digests.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch

# Files of a model directory that hold weights; their tensors are hashed as loaded instead.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".onnx", ".h5", ".msgpack", ".ckpt")


def tensors_digest(tensors: Mapping[str, torch.Tensor], extra: Iterable[bytes] = ()) -> str:
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    for part in extra:
        digest.update(hashlib.sha256(part).digest())
    return digest.hexdigest()


def directory_files(root: Path) -> list[bytes]:
    """Name and content of every file under `root` but weights, READMEs and hidden ones, in path order."""
    parts: list[bytes] = []
    for path in sorted(root.rglob("*")):
        relative = path.relative_to(root)
        if not path.is_file() or any(part.startswith(".") for part in relative.parts):
            continue
        if path.suffix in WEIGHT_SUFFIXES or path.name.lower().startswith("readme"):
            continue
        parts.append(str(relative).encode() + b"\0" + path.read_bytes())
    return parts


def deployment_version(model_digests: Mapping[str, str], length: int = 16) -> str:
    """The version of a set of named models: changes when any model's weights or name change."""
    digest = hashlib.sha256()
    for name in sorted(model_digests):
        digest.update(f"{name}\0{model_digests[name]}\n".encode())
    return digest.hexdigest()[:length]
