"""Digests of weights and the deployment version."""

from __future__ import annotations

from pathlib import Path

import torch

from model_api.models.digest import deployment_version, directory_files, tensors_digest


def test_equal_weights_give_equal_digests_and_any_change_a_new_one() -> None:
    weights = {
        "layer.weight": torch.arange(6, dtype=torch.float32).reshape(2, 3),
        "layer.bias": torch.ones(2),
    }
    same = {name: tensor.clone() for name, tensor in reversed(weights.items())}
    changed = dict(weights, **{"layer.bias": torch.tensor([1.0, 1.0000001])})
    reshaped = dict(weights, **{"layer.weight": weights["layer.weight"].reshape(3, 2)})
    retyped = dict(weights, **{"layer.bias": torch.ones(2, dtype=torch.float64)})
    digest = tensors_digest(weights)
    assert tensors_digest(same) == digest
    assert len({digest, tensors_digest(changed), tensors_digest(reshaped), tensors_digest(retyped)}) == 4
    assert tensors_digest(weights, extra=[b"tokenizer"]) != digest


def test_directory_files_skip_weights_readmes_and_hidden_files(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"weights")
    (tmp_path / "README.md").write_text("hello")
    (tmp_path / ".cache").mkdir()
    (tmp_path / ".cache" / "x.json").write_text("{}")
    (tmp_path / "1_Pooling").mkdir()
    (tmp_path / "1_Pooling" / "config.json").write_text('{"mean": true}')
    assert directory_files(tmp_path) == [b"1_Pooling/config.json\0" + b'{"mean": true}', b"config.json\0{}"]


def test_the_deployment_version_covers_every_model_and_its_name() -> None:
    version = deployment_version({"a": "1" * 64, "b": "2" * 64})
    assert version == deployment_version({"b": "2" * 64, "a": "1" * 64})
    assert version != deployment_version({"a": "1" * 64, "b": "3" * 64})
    assert version != deployment_version({"a": "1" * 64, "c": "2" * 64})
    assert version != deployment_version({"a": "1" * 64})
    assert len(version) == 16
