"""Pseudonyms and their key file."""

from __future__ import annotations

import doctest
import stat
import threading
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from forward_proxy.privacy import pseudonym
from forward_proxy.privacy.pseudonym import (
    PseudonymKeyError,
    Pseudonyms,
    load_or_create_key,
    main,
    parse_key,
    rotate_key,
)

KEY = bytes(range(32))


def test_same_address_same_id_and_different_addresses_different_ids() -> None:
    ids = Pseudonyms(KEY)
    assert ids.of("127.0.0.2") == ids.of("127.0.0.2")
    assert len({ids.of(f"127.0.0.{n}") for n in range(1, 255)}) == 254


def test_an_ipv4_client_has_one_id_however_the_listener_reports_it() -> None:
    ids = Pseudonyms(KEY)
    assert ids.of("::ffff:10.1.2.3") == ids.of("10.1.2.3")
    assert ids.of("fe80::1%eth0") == ids.of("fe80::1")


def test_ids_depend_on_the_key() -> None:
    assert Pseudonyms(KEY).of("127.0.0.2") != Pseudonyms(bytes(reversed(KEY))).of("127.0.0.2")


def test_an_id_contains_nothing_of_the_address() -> None:
    value = Pseudonyms(KEY).of("127.0.0.2")
    assert value.startswith("c-") and len(value) == 18
    assert "127" not in value and "7f00" not in value


@given(st.ip_addresses())
def test_ids_are_well_formed_for_every_address(address: object) -> None:
    value = Pseudonyms(KEY).of(str(address))
    assert value[:2] == "c-" and all(c in "0123456789abcdef" for c in value[2:])


def test_short_keys_are_refused() -> None:
    with pytest.raises(PseudonymKeyError, match="too short"):
        parse_key("short")
    with pytest.raises(PseudonymKeyError):
        Pseudonyms(b"x" * 8)


def test_parse_key_decodes_hex_and_takes_other_text_as_is() -> None:
    assert parse_key(KEY.hex() + "\n") == KEY
    assert parse_key("a passphrase that is long enough") == b"a passphrase that is long enough"


def test_key_file_is_created_once_with_mode_0600(tmp_path: Path) -> None:
    path = tmp_path / "state" / "pseudonym.key"
    first = load_or_create_key(path)
    assert len(first) == 32
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_or_create_key(path) == first
    assert [p.name for p in path.parent.iterdir()] == ["pseudonym.key"]  # no temporary file left


def test_processes_racing_to_create_the_key_agree(tmp_path: Path) -> None:
    path = tmp_path / "pseudonym.key"
    keys: list[bytes] = []
    barrier = threading.Barrier(8)

    def create() -> None:
        barrier.wait()
        keys.append(load_or_create_key(path))

    threads = [threading.Thread(target=create) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)
    assert len(keys) == 8 and len(set(keys)) == 1
    assert load_or_create_key(path) == keys[0]


def test_rotation_writes_a_new_key_that_changes_every_id(tmp_path: Path) -> None:
    path = tmp_path / "pseudonym.key"
    before = Pseudonyms(load_or_create_key(path)).of("127.0.0.2")
    assert main(["rotate", str(path)]) == 0
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert Pseudonyms(load_or_create_key(path)).of("127.0.0.2") != before
    rotate_key(path)
    assert len(list(tmp_path.iterdir())) == 1


def test_unreadable_key_files_are_explained(tmp_path: Path) -> None:
    path = tmp_path / "pseudonym.key"
    path.write_text("tiny")
    with pytest.raises(PseudonymKeyError, match=r"pseudonym\.key"):
        load_or_create_key(path)


def test_docstring_examples() -> None:
    assert doctest.testmod(pseudonym).failed == 0
