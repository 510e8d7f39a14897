"""Headless Chromium (Debian's `chromium`) as a subprocess: the rendered DOM of a page, or a screenshot."""

from __future__ import annotations

import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-proxy-server",
)


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        pytest.skip("headless chromium is not installed (scripts/install-system.sh installs it)")
    return found


def _run(url: str, profile: Path, *flags: str) -> str:
    argv = [chromium(), *_FLAGS, f"--user-data-dir={profile}", "--virtual-time-budget=5000", *flags, url]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def dump_dom(url: str, profile: Path) -> str:
    """The page's DOM after its scripts ran (5 s of virtual time: the dashboard's first polls)."""
    return _run(url, profile, "--dump-dom")


def screenshot(url: str, profile: Path, path: Path) -> Path:
    _run(url, profile, f"--screenshot={path}", "--window-size=1280,900", "--hide-scrollbars")
    assert path.exists() and path.stat().st_size > 10_000
    return path


class _TextById(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.texts: dict[str, str] = {}
        self._open: list[tuple[str, str | None]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        element_id = dict(attrs).get("id")
        self._open.append((tag, element_id))
        if element_id:
            self.texts[element_id] = ""

    def handle_endtag(self, tag: str) -> None:
        while self._open:
            opened, _ = self._open.pop()
            if opened == tag:
                break

    def handle_data(self, data: str) -> None:
        for _, element_id in self._open:
            if element_id:
                self.texts[element_id] += " " + data


def texts_by_id(dom: str) -> dict[str, str]:
    """The text content of every element that has an id (including its descendants' text)."""
    parser = _TextById()
    parser.feed(dom)
    return {key: " ".join(value.split()) for key, value in parser.texts.items()}
