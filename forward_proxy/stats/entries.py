"""What the cache holds, for `forward-proxy cache ls | show | purge`: selecting and describing entries.

Pure code over the store's `Entry` objects; `commands.py` does the I/O.

A `Selection` is what `purge` (and `ls`) names: every condition given must hold.

>>> Selection(route="/v1/*").describe()
'route /v1/*'
"""

from __future__ import annotations

import base64
import contextlib
import fnmatch
import json
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from forward_proxy.cache.units import format_duration, format_size
from forward_proxy.store.base import Entry


@dataclass(frozen=True)
class Selection:
    """Entries to list or purge. `route` is a glob over the cache rule label (`POST /v1/*`) or, when it
    starts with `/`, over the label's path part; `older_than` is in seconds; `keys` are whole key ids."""

    origin: str | None = None
    route: str | None = None
    older_than: float | None = None
    keys: tuple[str, ...] = ()

    @property
    def is_everything(self) -> bool:
        return self.origin is None and self.route is None and self.older_than is None and not self.keys

    def matches(self, entry: Entry, now: float) -> bool:
        if self.origin is not None and entry.origin.rstrip("/") != self.origin.rstrip("/"):
            return False
        if self.route is not None and not route_matches(self.route, entry.route):
            return False
        if self.older_than is not None and now - entry.stored_at < self.older_than:
            return False
        return not self.keys or entry.key_id in self.keys

    def describe(self) -> str:
        parts = []
        if self.origin is not None:
            parts.append(f"origin {self.origin}")
        if self.route is not None:
            parts.append(f"route {self.route}")
        if self.older_than is not None:
            parts.append(f"older than {format_duration(self.older_than)}")
        if self.keys:
            parts.append("key " + ", ".join(self.keys))
        return " and ".join(parts) or "every entry"


def route_matches(pattern: str, route: str) -> bool:
    """`POST /v1/*` matches the label `POST /v1/embeddings`; `/v1/*` matches it too (any method)."""
    if fnmatch.fnmatchcase(route, pattern):
        return True
    _, _, path = route.partition(" ")
    return pattern.startswith("/") and fnmatch.fnmatchcase(path, pattern)


def select(entries: Iterable[tuple[str, Entry]], selection: Selection, now: float) -> list[tuple[str, Entry]]:
    """The matching (store key, entry) pairs, oldest first."""
    chosen = [(key, entry) for key, entry in entries if selection.matches(entry, now)]
    return sorted(chosen, key=lambda pair: (pair[1].stored_at, pair[1].key_id))


class AmbiguousKey(LookupError):
    def __init__(self, key: str, candidates: Sequence[str]) -> None:
        super().__init__(f"key id {key!r} is the start of {len(candidates)} entries: {', '.join(candidates)}")


def find(entries: Iterable[tuple[str, Entry]], key_id: str) -> tuple[str, Entry] | None:
    """The entry whose key id is `key_id` or, failing that, the one entry whose key id starts with it."""
    prefixed = []
    for key, entry in entries:
        if entry.key_id == key_id:
            return key, entry
        if entry.key_id.startswith(key_id):
            prefixed.append((key, entry))
    if len(prefixed) > 1:
        raise AmbiguousKey(key_id, sorted(entry.key_id for _, entry in prefixed))
    return prefixed[0] if prefixed else None


# ---------------------------------------------------------------------------------------------------
# How entries read.


def entry_json(entry: Entry, now: float, with_content: bool = False) -> dict[str, Any]:
    """One entry as `cache ls --json` and `cache show --json` print it."""
    described: dict[str, Any] = {
        "key": entry.key_id,
        "origin": entry.origin,
        "route": entry.route,
        "model": entry.model,
        "method": entry.method,
        "path": entry.path,
        "status": entry.status_code,
        "stored_at": round(entry.stored_at, 3),
        "age_seconds": round(max(0.0, now - entry.stored_at), 3),
        "size": entry.size,
        "upstream_seconds": round(entry.upstream_seconds, 6),
        "model_version": entry.model_version,
    }
    if with_content:
        described["headers"] = [list(pair) for pair in entry.headers]
        try:
            described["body"], described["body_encoding"] = entry.content.decode(), "utf-8"
        except UnicodeDecodeError:
            described["body"], described["body_encoding"] = base64.b64encode(entry.content).decode(), "base64"
    return described


def listing(entries: Sequence[tuple[str, Entry]], now: float) -> str:
    """The table `cache ls` prints, newest first, with a total line."""
    if not entries:
        return "The cache holds no entries.\n"
    header = ("KEY", "AGE", "SIZE", "STATUS", "ORIGIN", "ROUTE", "MODEL", "PATH")
    rows = [
        (
            entry.key_id,
            format_duration(max(0.0, now - entry.stored_at)),
            format_size(entry.size),
            str(entry.status_code),
            entry.origin,
            entry.route,
            entry.model or "-",
            entry.path,
        )
        for _, entry in sorted(entries, key=lambda pair: -pair[1].stored_at)
    ]
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]
    lines = [
        "  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip() for row in (header, *rows)
    ]
    total = sum(entry.size for _, entry in entries)
    lines.append(f"{len(entries)} {'entry' if len(entries) == 1 else 'entries'}, {format_size(total)}")
    return "\n".join(lines) + "\n"


BODY_PREVIEW_CHARACTERS = 4000


def details(entry: Entry, now: float) -> str:
    """What `cache show KEY` prints: the entry's metadata, its headers and a preview of its body."""
    stored = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(entry.stored_at))
    fields = [
        ("key", entry.key_id),
        ("origin", entry.origin),
        ("route", entry.route),
        ("model", entry.model or "-"),
        ("request", f"{entry.method} {entry.path}"),
        ("status", str(entry.status_code)),
        ("stored", f"{stored} ({format_duration(max(0.0, now - entry.stored_at))} ago)"),
        ("upstream time", f"{entry.upstream_seconds:.3f} s (saved again by every hit)"),
        ("model version", entry.model_version or "-"),
        ("size", format_size(entry.size)),
    ]
    width = max(len(name) for name, _ in fields)
    lines = [f"{name:<{width}}  {value}" for name, value in fields]
    lines += ["", "headers"]
    lines += [f"  {name}: {value}" for name, value in entry.headers]
    lines += ["", f"body ({len(entry.content)} bytes)"]
    lines.append(_preview(entry.content))
    return "\n".join(lines) + "\n"


def _preview(content: bytes) -> str:
    try:
        text = content.decode()
    except UnicodeDecodeError:
        return "  (binary; `forward-proxy cache show KEY --body > FILE` writes it out)"
    with contextlib.suppress(ValueError):  # not JSON: shown as it is
        text = json.dumps(json.loads(text), indent=2, ensure_ascii=False)
    if len(text) > BODY_PREVIEW_CHARACTERS:
        hidden = len(text) - BODY_PREVIEW_CHARACTERS
        text = text[:BODY_PREVIEW_CHARACTERS] + f"\n… {hidden} more characters (`--body` prints all of it)"
    return text
