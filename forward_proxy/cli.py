"""The `forward-proxy` command: parses arguments and hands each subcommand to the module that owns it.

- `run`          forward_proxy.launcher   (mitmproxy in-process with the project's addons)
- `stats`        forward_proxy.stats.commands
- `cache ...`    forward_proxy.stats.commands
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from forward_proxy import launcher
from forward_proxy.stats import commands as stats_commands

Handler = Callable[[argparse.Namespace], int]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="forward-proxy",
        description="A caching, IP-masking forward proxy for inference APIs, built on mitmproxy.",
    )
    subcommands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    launcher.register(subcommands)
    stats_commands.register(subcommands)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Handler = args.handler
    try:
        return handler(args)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
