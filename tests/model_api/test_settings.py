"""Settings, `--model` values and the command line built from the settings."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from model_api.cli import SERVE_OPTIONS, build_parser, main
from model_api.models.registry import (
    DEFAULT_MODEL,
    ModelSpecError,
    bundled_minilm_dir,
    load_model,
    parse_model_spec,
)
from model_api.settings import Settings


def test_defaults_serve_minilm_on_loopback_with_batching() -> None:
    settings = Settings()
    assert (settings.host, settings.port, settings.models) == ("127.0.0.1", 8000, (DEFAULT_MODEL,))
    assert settings.batching and settings.max_batch_size >= 1


@pytest.mark.parametrize(
    "bad",
    [{"max_batch_size": 0}, {"port": 70000}, {"device": "tpu"}, {"max_batch_delay_ms": -1}, {"models": ()}],
)
def test_invalid_settings_are_refused(bad: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        Settings(**bad)  # type: ignore[arg-type]


def test_every_setting_has_a_flag_and_a_description() -> None:
    assert set(SERVE_OPTIONS) == set(Settings.model_fields)
    assert all(field.description for field in Settings.model_fields.values())


def test_the_bundled_model_name_resolves_to_the_package_weights() -> None:
    spec = parse_model_spec(DEFAULT_MODEL)
    assert spec.name == DEFAULT_MODEL
    assert (spec.source / "modules.json").exists()
    assert parse_model_spec(f"mini={DEFAULT_MODEL}").source == bundled_minilm_dir()


def test_name_equals_source_and_bare_paths(tmp_path: Path) -> None:
    program = tmp_path / "digits.pt2"
    program.write_bytes(b"")
    assert parse_model_spec(f"d={program}").name == "d"
    assert parse_model_spec(str(program)).name == "digits"
    assert parse_model_spec(f"d={program}").source == program.resolve()


@pytest.mark.parametrize("text", ["d=/no/such/file.pt2", "=x", "a/b=/tmp", "/no/such/dir"])
def test_unusable_model_values_are_refused_with_a_reason(text: str) -> None:
    with pytest.raises(ModelSpecError, match="--model"):
        parse_model_spec(text)


def test_the_command_line_maps_onto_settings() -> None:
    arguments = build_parser().parse_args(
        [
            "serve",
            "--port",
            "9000",
            "--no-batching",
            "--model",
            "a=x",
            "--model",
            "b=y",
            "--max-batch-size",
            "4",
        ]
    )
    assert arguments.port == 9000
    assert arguments.batching is False
    assert arguments.models == ["a=x", "b=y"]
    assert arguments.max_batch_size == 4
    assert arguments.host is None  # left to the settings' default


def test_an_invalid_option_value_names_the_flag(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        main(["serve", "--max-batch-size", "0"])
    assert caught.value.code == 2
    assert "--max-batch-size" in capsys.readouterr().err


def test_a_missing_model_file_stops_serve_with_a_message(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--model", "d=/no/such/file.pt2"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_a_damaged_model_file_is_refused_with_its_path(tmp_path: Path) -> None:
    damaged = tmp_path / "damaged.pt2"
    damaged.write_text("not a zip archive")
    with pytest.raises(ModelSpecError, match=r"damaged\.pt2: cannot be loaded as model 'damaged'"):
        load_model(parse_model_spec(str(damaged)), "cpu")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ModelSpecError, match=r"not a \.pt2"):
        load_model(parse_model_spec(f"notes={tmp_path / 'notes.txt'}"), "cpu")
