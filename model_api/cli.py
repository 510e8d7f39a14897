"""The `model-api` command: `serve` and `export-example`. It parses arguments, nothing else.

`serve`'s options, defaults and help texts come from `model_api.settings.Settings`. This module imports
neither torch nor pydantic at the top, so `model-api --help` answers in any environment; the subcommands
need the model environment (`.venv-model`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

# Settings field -> (flags, extra argparse arguments). Each flag's help and default are the field's.
SERVE_OPTIONS: dict[str, tuple[tuple[str, ...], dict[str, Any]]] = {
    "host": (("--host",), {}),
    "port": (("--port",), {"type": int}),
    "models": (("--model",), {"action": "append", "metavar": "NAME=SOURCE"}),
    "chat": (("--chat",), {"action": argparse.BooleanOptionalAction}),
    "device": (("--device",), {"metavar": "auto|cpu|cuda[:N]"}),
    "batching": (("--batching",), {"action": argparse.BooleanOptionalAction}),
    "max_batch_size": (("--max-batch-size",), {"type": int, "metavar": "N"}),
    "max_batch_delay_ms": (("--max-batch-delay-ms",), {"type": float, "metavar": "MS"}),
    "max_queued_rows": (("--max-queued-rows",), {"type": int, "metavar": "N"}),
    "max_inputs": (("--max-inputs",), {"type": int, "metavar": "N"}),
    "max_text_chars": (("--max-text-chars",), {"type": int, "metavar": "N"}),
    "max_body_bytes": (("--max-body-bytes",), {"type": int, "metavar": "BYTES"}),
    "accept_token_ids": (("--accept-token-ids",), {"action": argparse.BooleanOptionalAction}),
    "max_generated_tokens": (("--max-generated-tokens",), {"type": int, "metavar": "N"}),
    "max_prompt_tokens": (("--max-prompt-tokens",), {"type": int, "metavar": "N"}),
    "max_generation_batch": (("--max-generation-batch",), {"type": int, "metavar": "N"}),
    "max_queued_generations": (("--max-queued-generations",), {"type": int, "metavar": "N"}),
    "client_pseudonym_header": (("--client-pseudonym-header",), {"metavar": "NAME"}),
    "log_level": (("--log-level",), {"choices": ["debug", "info", "warning", "error"]}),
}

MISSING_ENVIRONMENT = (
    "this environment lacks the model server's packages (torch, pydantic, fastapi); "
    "run .venv-model/bin/model-api, or build it with `make venvs`"
)


def _add_serve_options(parser: argparse.ArgumentParser) -> None:
    try:
        from model_api.settings import Settings
    except ImportError:
        parser.description = f"Unavailable here: {MISSING_ENVIRONMENT}."
        return
    for field, (flags, extra) in SERVE_OPTIONS.items():
        info = Settings.model_fields[field]
        default = info.default
        shown = " ".join(default) if isinstance(default, tuple) else default
        parser.add_argument(
            *flags, dest=field, default=None, help=f"{info.description} (default: {shown})", **extra
        )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="model-api",
        description=(
            "A PyTorch model server: OpenAI embeddings and chat completions (/v1) and KServe v2 (/v2), "
            "dynamically batched."
        ),
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    serve = commands.add_parser("serve", help="load the models and serve them over HTTP")
    _add_serve_options(serve)
    export = commands.add_parser(
        "export-example", help="train a small digits classifier (seconds) and export it as a tensor model"
    )
    export.add_argument("path", type=Path, help="file to write: .pt2 (torch.export) or .pt (TorchScript)")
    export.add_argument("--seed", type=int, default=0, help="seed of the initial weights (default: 0)")
    export.add_argument("--epochs", type=int, default=200, help="full-batch training steps (default: 200)")
    return parser


def _serve(parser: argparse.ArgumentParser, arguments: argparse.Namespace) -> int:
    try:
        from pydantic import ValidationError

        from model_api.models.registry import ModelSpecError
        from model_api.server import serve
        from model_api.settings import Settings
    except ImportError as error:
        parser.error(f"{MISSING_ENVIRONMENT} ({error})")
    given = {
        field: getattr(arguments, field) for field in SERVE_OPTIONS if getattr(arguments, field) is not None
    }
    try:
        settings = Settings(**given)
    except ValidationError as error:
        problems = "; ".join(
            f"{SERVE_OPTIONS[str(problem['loc'][0])][0][0]}: {problem['msg']}" for problem in error.errors()
        )
        parser.error(problems)
    try:
        serve(settings)
    except ModelSpecError as error:
        print(f"model-api: error: {error}", file=sys.stderr)
        return 2
    return 0


def _export_example(parser: argparse.ArgumentParser, arguments: argparse.Namespace) -> int:
    try:
        from model_api.models.example import export_example
    except ImportError as error:
        parser.error(f"{MISSING_ENVIRONMENT} ({error})")
    if arguments.path.suffix not in (".pt2", ".pt"):
        parser.error(f"{arguments.path}: the file name must end in .pt2 (torch.export) or .pt (TorchScript)")
    report = export_example(arguments.path, seed=arguments.seed, epochs=arguments.epochs)
    print(
        f"wrote {report.path}: held-out accuracy {report.held_out_accuracy:.4f} "
        f"on {report.held_out_count} digits; serve it with "
        f"`model-api serve --model digits={report.path}`"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    arguments = parser.parse_args(argv)
    if arguments.command == "serve":
        return _serve(parser, arguments)
    if arguments.command == "export-example":
        return _export_example(parser, arguments)
    parser.print_help()
    return 2
