"""`forward-proxy stats` and `forward-proxy cache ...` (being built, issue 5)."""

from __future__ import annotations

import argparse
from typing import Any


def register(subcommands: Any) -> None:
    stats: argparse.ArgumentParser = subcommands.add_parser("stats", help="print cache statistics")
    stats.set_defaults(handler=_not_built)
    cache: argparse.ArgumentParser = subcommands.add_parser("cache", help="inspect and purge cache entries")
    cache.set_defaults(handler=_not_built)


def _not_built(args: argparse.Namespace) -> int:
    raise SystemExit(f"forward-proxy {args.command}: not built yet")
