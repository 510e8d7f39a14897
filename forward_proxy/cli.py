"""The `forward-proxy` command (the subcommands arrive with the package's issue)."""

import argparse


def build_parser() -> argparse.ArgumentParser:
    return argparse.ArgumentParser(prog="forward-proxy")


def main(argv: list[str] | None = None) -> int:
    build_parser().parse_args(argv)
    return 0
