"""`forward-proxy stats` and `forward-proxy cache ls | show | purge`: read the cache directory directly.

Both work with the proxy running or stopped: they open the same store the proxy uses (diskcache is safe
across processes) and never change its settings.

    forward-proxy stats [--json] [--watch SECONDS] [--cache-dir DIR] [--reset]
    forward-proxy cache ls [--json] [--origin O] [--route PATTERN] [--older-than AGE]
    forward-proxy cache show KEY [--json | --body]
    forward-proxy cache purge [KEY ...] [--origin O] [--route PATTERN] [--older-than AGE] [--all] [--dry-run]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from forward_proxy.cache.config import default_cache_dir
from forward_proxy.cache.units import format_size, parse_duration
from forward_proxy.stats import entries
from forward_proxy.stats.report import read_report, render_table
from forward_proxy.store.backend import open_backend
from forward_proxy.store.base import CacheStore, CounterStore, StoreError

_CLEAR_SCREEN = "\x1b[H\x1b[2J"


class CommandError(Exception):
    """A one-line explanation for the user; the command exits with `status`."""

    def __init__(self, message: str, status: int = 1) -> None:
        super().__init__(message)
        self.status = status


def register(subcommands: Any) -> None:
    where = argparse.ArgumentParser(add_help=False)
    where.add_argument(
        "--cache-dir",
        type=Path,
        metavar="DIR",
        help="the proxy's cache directory (default: $FORWARD_PROXY_CACHE_DIR, else ~/.cache/forward-proxy)",
    )
    where.add_argument(
        "--cache-backend",
        default="",
        metavar="URL",
        help="the proxies' Redis URL (their --cache-backend), instead of a cache directory",
    )

    stats: argparse.ArgumentParser = subcommands.add_parser(
        "stats",
        parents=[where],
        help="print cache statistics",
        description="Print what the cache did: requests, hits, misses, bypasses, refreshes, coalesced "
        "waiters, stale answers, partial answers and the rows of batches answered row by row, stores, "
        "errors, evictions, hit ratio, bytes and upstream time saved, overall and per origin, route and model, and how full the cache is. Counters are shared by "
        "every proxy on the cache directory and survive restarts.",
    )
    stats.add_argument("--json", action="store_true", help="print the report as one JSON object")
    stats.add_argument(
        "--watch",
        type=_positive_seconds,
        metavar="SECONDS",
        help="print the report again every SECONDS until Ctrl-C (with --json: one object per line)",
    )
    stats.add_argument(
        "--reset", action="store_true", help="set every counter to zero and start counting again now"
    )
    stats.set_defaults(handler=_guarded(run_stats))

    cache: argparse.ArgumentParser = subcommands.add_parser(
        "cache",
        help="inspect and purge cache entries",
        description="List, show and purge the entries of the cache directory.",
    )
    actions = cache.add_subparsers(dest="action", required=True, metavar="ACTION")

    selection = argparse.ArgumentParser(add_help=False)
    selection.add_argument("--origin", metavar="ORIGIN", help="only entries of this origin, http://host:port")
    selection.add_argument(
        "--route",
        metavar="PATTERN",
        help="only entries whose cache rule matches this glob: 'POST /v1/*', or a path glob such as '/v2/*'",
    )
    selection.add_argument(
        "--older-than",
        type=_age,
        metavar="AGE",
        help="only entries stored more than AGE ago: 90s, 30m, 2h, 1d",
    )

    ls = actions.add_parser(
        "ls", parents=[where, selection], help="list entries, newest first", description="List the entries."
    )
    ls.add_argument("--json", action="store_true", help="print a JSON array")
    ls.set_defaults(handler=_guarded(run_ls))

    show = actions.add_parser(
        "show",
        parents=[where],
        help="show one entry",
        description="Show one entry: its request, status, headers, timing and body.",
    )
    show.add_argument("key", metavar="KEY", help="the key id (`cache ls`, X-Cache-Key header) or its start")
    output = show.add_mutually_exclusive_group()
    output.add_argument("--json", action="store_true", help="print the entry as JSON, with headers and body")
    output.add_argument("--body", action="store_true", help="write the stored body bytes to stdout")
    show.set_defaults(handler=_guarded(run_show))

    purge = actions.add_parser(
        "purge",
        parents=[where, selection],
        help="remove entries",
        description="Remove the entries that match every condition given, and print each one removed. "
        "Without a condition it refuses, unless --all says to empty the cache.",
    )
    purge.add_argument("keys", nargs="*", metavar="KEY", help="whole key ids to remove")
    purge.add_argument("--all", action="store_true", help="remove every entry (not with other conditions)")
    purge.add_argument("--dry-run", action="store_true", help="print what would be removed, remove nothing")
    purge.set_defaults(handler=_guarded(run_purge))


# ---------------------------------------------------------------------------------------------------
# The commands


def run_stats(args: argparse.Namespace) -> int:
    with _opened(args) as (cache, counters):
        if args.reset:
            counters.reset()
            print(f"Counters of {_directory(args)} reset; counting starts again now.")
            return 0
        while True:
            report = read_report(cache, counters)
            if args.json:
                print(json.dumps(report, indent=None if args.watch else 2), flush=True)
            else:
                screen = _CLEAR_SCREEN if args.watch and sys.stdout.isatty() else ""
                print(screen + render_table(report), end="", flush=True)
            if not args.watch:
                return 0
            try:
                time.sleep(args.watch)
            except KeyboardInterrupt:
                return 0
            if not args.json:
                print()


def run_ls(args: argparse.Namespace) -> int:
    now = time.time()
    with _opened(args) as (cache, _):
        chosen = entries.select(cache.iter_entries(), _selection(args), now)
    if args.json:
        newest_first = sorted(chosen, key=lambda pair: -pair[1].stored_at)
        print(json.dumps([entries.entry_json(entry, now) for _, entry in newest_first], indent=2))
    else:
        print(entries.listing(chosen, now), end="")
    return 0


def run_show(args: argparse.Namespace) -> int:
    now = time.time()
    with _opened(args) as (cache, _):
        try:
            found = entries.find(cache.iter_entries(), args.key)
        except entries.AmbiguousKey as exc:
            raise CommandError(f"{exc}; give more of it.") from None
    if found is None:
        raise CommandError(f"no entry has the key id {args.key!r}; `forward-proxy cache ls` lists them.")
    _, entry = found
    if args.body:
        sys.stdout.buffer.write(entry.content)
        sys.stdout.flush()
    elif args.json:
        print(json.dumps(entries.entry_json(entry, now, with_content=True), indent=2))
    else:
        print(entries.details(entry, now), end="")
    return 0


def run_purge(args: argparse.Namespace) -> int:
    selection = _selection(args)
    if args.all and not selection.is_everything:
        raise CommandError(
            "--all removes every entry; leave it out to remove only what the conditions name.", 2
        )
    if selection.is_everything and not args.all:
        raise CommandError(
            "refusing to remove every entry: name what to remove (KEY, --origin, --route, --older-than) "
            "or say --all.",
            2,
        )
    now = time.time()
    verb = "would remove" if args.dry_run else "removed"
    removed = 0
    size = 0
    with _opened(args) as (cache, _):
        for key, entry in entries.select(cache.iter_entries(), selection, now):
            if not args.dry_run and not cache.delete(key):
                continue  # expired or removed by someone else meanwhile
            removed += 1
            size += entry.size
            print(f"{verb} {entry.key_id}  {entry.origin}  {entry.route}  {entry.path}")
    noun = "entry" if removed == 1 else "entries"
    print(f"{verb} {removed} {noun} ({format_size(size)}) matching {selection.describe()}")
    return 0


# ---------------------------------------------------------------------------------------------------
# Helpers


def _guarded(command: Any) -> Any:
    """Turn store failures and user mistakes into one line on stderr and an exit status."""

    def run(args: argparse.Namespace) -> int:
        name = "stats" if args.command == "stats" else f"cache {args.action}"
        try:
            return int(command(args))
        except CommandError as exc:
            print(f"forward-proxy {name}: {exc}", file=sys.stderr)
            return exc.status
        except StoreError as exc:
            print(
                f"forward-proxy {name}: the cache at {_directory(args)} could not be read: {exc}",
                file=sys.stderr,
            )
            return 1

    return run


def _directory(args: argparse.Namespace) -> Path:
    return Path(args.cache_dir).expanduser() if args.cache_dir else default_cache_dir()


@contextlib.contextmanager
def _opened(args: argparse.Namespace) -> Iterator[tuple[CacheStore, CounterStore]]:
    directory = _directory(args)
    if not args.cache_backend and not directory.is_dir():
        raise CommandError(
            f"there is no cache at {directory} yet (the proxy creates it on its first run); "
            "give the proxy's --cache-dir."
        )
    try:
        backend = open_backend(args.cache_backend, directory, None)
    except ValueError as exc:
        raise CommandError(f"--cache-backend: {exc}", 2) from None
    cache, counters = backend.entries, backend.counters
    try:
        yield cache, counters
    finally:
        cache.close()
        counters.close()


def _selection(args: argparse.Namespace) -> entries.Selection:
    return entries.Selection(
        origin=args.origin,
        route=args.route,
        older_than=args.older_than,
        keys=tuple(getattr(args, "keys", ())),
    )


def _age(text: str) -> float:
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _positive_seconds(text: str) -> float:
    seconds = _age(text)
    if seconds <= 0:
        raise argparse.ArgumentTypeError("must be more than 0 seconds, e.g. 2")
    return seconds
