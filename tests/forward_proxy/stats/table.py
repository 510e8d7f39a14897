"""Read back the table `forward-proxy stats` prints, so tests compare its numbers, not its looks."""

from __future__ import annotations

import re

ROUTE_HEADER = "ORIGIN"


def parse_table(text: str) -> tuple[dict[str, str], list[dict[str, str]]]:
    """(summary label → value, one dict per route row keyed by the column titles)."""
    summary: dict[str, str] = {}
    routes: list[dict[str, str]] = []
    lines = text.splitlines()
    header_at = next((i for i, line in enumerate(lines) if line.startswith(ROUTE_HEADER)), len(lines))
    for line in lines[1:header_at]:
        match = re.match(r"^  (\S+(?: \S+)*)  +(.+)$", line)
        if match:
            summary[match.group(1)] = match.group(2)
    if header_at < len(lines):
        header = lines[header_at]
        titles = re.findall(r"\S+(?: \S+)*", header)
        for line in lines[header_at + 1 :]:
            # columns are separated by two spaces or more; a cell never holds two spaces in a row
            cells = re.split(r" {2,}", line.strip())
            routes.append(dict(zip(titles, cells, strict=True)))
    return summary, routes
