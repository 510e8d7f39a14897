"""Which `--model` values are chat models, where the bundled one comes from, and how it joins the version."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from model_api.cli import main
from model_api.generation.model import bundled_chat_model_file, is_chat_source
from model_api.models import registry as registry_module
from model_api.models.registry import Registry, parse_model_spec
from model_api.settings import DEFAULT_CHAT_MODEL, Settings


def test_the_bundled_chat_model_is_the_gguf_file_of_the_installed_wheel() -> None:
    path = bundled_chat_model_file()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size > 50_000_000
    assert parse_model_spec(DEFAULT_CHAT_MODEL).source == path
    assert parse_model_spec(f"smol={DEFAULT_CHAT_MODEL}").name == "smol"


def test_gguf_files_and_transformers_directories_are_chat_models(tmp_path: Path) -> None:
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    program = tmp_path / "digits.pt2"
    program.write_bytes(b"")
    causal = tmp_path / "causal"
    causal.mkdir()
    (causal / "config.json").write_text("{}")
    sentence = tmp_path / "sentence"
    sentence.mkdir()
    (sentence / "config.json").write_text("{}")
    (sentence / "modules.json").write_text("[]")
    assert [is_chat_source(path) for path in (gguf, program, causal, sentence)] == [True, False, True, False]


def test_chat_is_on_by_default_and_can_be_left_out() -> None:
    assert Settings().chat
    assert not Settings(chat=False).chat


def engine(name: str, digest: str) -> Any:
    """What the registry reads of a generation engine: its name and its model's digest."""
    return SimpleNamespace(name=name, model=SimpleNamespace(digest=digest))


def test_the_chat_models_weights_are_part_of_the_deployment_version() -> None:
    versions = {
        Registry([], [engine("chat", "a" * 64)]).version,
        Registry([], [engine("chat", "b" * 64)]).version,
        Registry([], [engine("other", "a" * 64)]).version,
        Registry([], []).version,
    }
    assert len(versions) == 4


def test_a_file_that_is_no_gguf_stops_serve_with_a_reason(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"not a gguf file")
    assert main(["serve", "--no-chat", "--device", "cpu", "--model", f"broken={broken}"]) == 2
    error = capsys.readouterr().err
    assert f"{broken}: cannot be loaded as chat model 'broken'" in error


def test_the_bundled_chat_model_is_loaded_once_and_only_with_chat_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    loaded: list[str] = []

    def load_chat_model(spec: Any, device: str, settings: Settings) -> Any:
        loaded.append(spec.name)
        return engine(spec.name, "a" * 64)

    monkeypatch.setattr(registry_module, "load_chat_model", load_chat_model)
    other = tmp_path / "other.gguf"
    other.write_bytes(b"GGUF")

    def names(**settings: Any) -> list[str]:
        loaded.clear()
        registry = registry_module.load_registry(Settings(device="cpu", **settings))
        assert sorted(registry.chat_models) == sorted(loaded)
        return loaded

    assert names(models=(f"other={other}",)) == ["other", DEFAULT_CHAT_MODEL]
    assert names(models=(f"other={other}",), chat=False) == ["other"]
    assert names(models=(f"smol={DEFAULT_CHAT_MODEL}",)) == ["smol"]
    assert names(models=(DEFAULT_CHAT_MODEL,)) == [DEFAULT_CHAT_MODEL]
