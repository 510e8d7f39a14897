"""Pseudonymous client ids: a keyed HMAC of the client address, and the key file it needs.

The same address always gets the same id under one key, different addresses get different ids, and
without the key nobody can turn an id back into an address or test a guess. No mitmproxy here.

>>> ids = Pseudonyms(b"k" * 32)
>>> ids.of("127.0.0.2") == ids.of("::ffff:127.0.0.2"), ids.of("127.0.0.2") == ids.of("127.0.0.3")
(True, False)
>>> ids.of("127.0.0.2")[:2]
'c-'

Key file: 32 random bytes written as hex, created once with mode 0600 (atomically: two proxies starting
at the same moment end up with the same key). Rotating = a new key, e.g.
`python -m forward_proxy.privacy.pseudonym rotate ~/.cache/forward-proxy/pseudonym.key`.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import os
import secrets
import stat
import sys
from pathlib import Path

from forward_proxy.policy.clients import client_address

PREFIX = "c-"
ID_BYTES = 8  # 64 bits: no collisions among any realistic number of clients
MIN_KEY_BYTES = 16
KEY_FILE_NAME = "pseudonym.key"


class PseudonymKeyError(ValueError):
    """The key (option or file) cannot be used; the message says how to fix it."""


class Pseudonyms:
    """Client address -> pseudonym under one key. Thread-safe (no state but the key)."""

    def __init__(self, key: bytes) -> None:
        if len(key) < MIN_KEY_BYTES:
            raise PseudonymKeyError(f"the pseudonym key has {len(key)} bytes; use at least {MIN_KEY_BYTES}")
        self._key = key

    def of(self, address: str) -> str:
        canonical = client_address(address).compressed.encode("ascii")
        digest = hmac.new(self._key, b"client-address\x00" + canonical, hashlib.sha256).digest()
        return PREFIX + digest[:ID_BYTES].hex()


def parse_key(text: str) -> bytes:
    """Key material from an option or a file: hex (as this module writes it) or any other text."""
    material = text.strip()
    try:
        key = bytes.fromhex(material) if len(material) >= 2 * MIN_KEY_BYTES else b""
    except ValueError:
        key = b""
    key = key or material.encode("utf-8")
    if len(key) < MIN_KEY_BYTES:
        raise PseudonymKeyError(
            f"the pseudonym key is too short ({len(key)} bytes); give at least {MIN_KEY_BYTES} bytes, "
            f"e.g. the output of `python -c 'import secrets; print(secrets.token_hex(32))'`"
        )
    return key


def load_or_create_key(path: Path) -> bytes:
    """The key in `path`, created (mode 0600, parent 0700) if the file does not exist yet."""
    path = path.expanduser()
    try:
        return _read_key(path)
    except FileNotFoundError:
        pass
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        _write_key(path, exclusive=True)
    except FileExistsError:
        pass  # another process created it first: use theirs
    except OSError as exc:
        raise PseudonymKeyError(f"cannot create the pseudonym key file {path}: {exc.strerror}") from exc
    return _read_key(path)


def rotate_key(path: Path) -> None:
    """Replace the key in `path` with a new random one (atomic); every pseudonym changes."""
    path = path.expanduser()
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    _write_key(path, exclusive=False)


def world_readable(path: Path) -> bool:
    return bool(path.expanduser().stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO))


def _read_key(path: Path) -> bytes:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise
    except (OSError, UnicodeDecodeError) as exc:
        raise PseudonymKeyError(f"cannot read the pseudonym key file {path}: {exc}") from exc
    try:
        return parse_key(text)
    except PseudonymKeyError as exc:
        raise PseudonymKeyError(f"{path}: {exc}") from None


def _write_key(path: Path, *, exclusive: bool) -> None:
    # Written to a private temporary file first, then linked (exclusive) or renamed into place, so
    # no reader ever sees a half-written key.
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="ascii") as handle:
            handle.write(secrets.token_hex(32) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        if exclusive:
            os.link(temporary, path)
        else:
            os.replace(temporary, path)
    finally:
        if temporary.exists():
            temporary.unlink()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m forward_proxy.privacy.pseudonym",
        description="Manage the proxy's pseudonym key file.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    rotate = commands.add_parser("rotate", help="write a new random key (restart the proxy to use it)")
    rotate.add_argument("path", type=Path, help=f"the key file, e.g. ~/.cache/forward-proxy/{KEY_FILE_NAME}")
    args = parser.parse_args(argv)
    rotate_key(args.path)
    print(f"wrote a new pseudonym key to {args.path}; restart the proxy to use it", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
