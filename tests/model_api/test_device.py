"""`--device auto|cpu|cuda[:N]`: which device the models run on, and the refusal when CUDA is missing."""

from __future__ import annotations

import subprocess

import pytest
import torch

from model_api.models.registry import ModelSpecError, resolve_device
from tests.support.model_server import model_api_command
from tests.support.processes import REPO, free_port


def pretend_cuda(monkeypatch: pytest.MonkeyPatch, available: bool, count: int = 1) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: available)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count if available else 0)


def test_auto_picks_the_cpu_when_torch_sees_no_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    pretend_cuda(monkeypatch, False)
    assert resolve_device("auto") == "cpu"


def test_auto_picks_cuda_when_torch_sees_a_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    pretend_cuda(monkeypatch, True)
    assert resolve_device("auto") == "cuda"


@pytest.mark.parametrize("available", [False, True])
def test_an_explicit_cpu_is_kept_whatever_torch_sees(
    monkeypatch: pytest.MonkeyPatch, available: bool
) -> None:
    pretend_cuda(monkeypatch, available)
    assert resolve_device("cpu") == "cpu"


@pytest.mark.parametrize("device", ["cuda", "cuda:0"])
def test_an_explicit_cuda_device_is_kept_when_torch_sees_a_gpu(
    monkeypatch: pytest.MonkeyPatch, device: str
) -> None:
    pretend_cuda(monkeypatch, True)
    assert resolve_device(device) == device


def test_a_cuda_index_past_the_last_gpu_is_refused_with_the_count(monkeypatch: pytest.MonkeyPatch) -> None:
    pretend_cuda(monkeypatch, True, count=2)
    assert resolve_device("cuda:1") == "cuda:1"
    with pytest.raises(ModelSpecError) as refused:
        resolve_device("cuda:2")
    assert str(refused.value).startswith("--device cuda:2: ") and "2 CUDA device(s)" in str(refused.value)


@pytest.mark.parametrize("device", ["cuda", "cuda:0"])
def test_cuda_without_a_gpu_is_refused_naming_the_option_and_the_way_out(
    monkeypatch: pytest.MonkeyPatch, device: str
) -> None:
    pretend_cuda(monkeypatch, False)
    with pytest.raises(ModelSpecError) as refused:
        resolve_device(device)
    message = str(refused.value)
    assert message.startswith(f"--device {device}: ")
    assert "no CUDA device" in message
    assert "--device cpu" in message


@pytest.mark.integration
@pytest.mark.skipif(torch.cuda.is_available(), reason="this host has a GPU, so --device cuda is valid here")
def test_serve_with_cuda_but_no_gpu_exits_2_before_loading_or_listening() -> None:
    port = free_port()
    finished = subprocess.run(
        [model_api_command(), "serve", "--host", "127.0.0.1", "--port", str(port), "--device", "cuda"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert finished.returncode == 2, finished.stderr
    assert "model-api: error: --device cuda: " in finished.stderr
    assert "no CUDA device" in finished.stderr
    # Refused before any model was loaded, hence before the server listened.
    assert "loaded model" not in finished.stderr
    assert "listening on" not in finished.stderr
