"""`forward-proxy run`: mitmproxy's master with the project's addons (being built, issue 3)."""

from __future__ import annotations

import argparse
from typing import Any


def register(subcommands: Any) -> None:
    parser: argparse.ArgumentParser = subcommands.add_parser("run", help="run the proxy")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    raise SystemExit("forward-proxy run: not built yet")
