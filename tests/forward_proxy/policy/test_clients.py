"""Client networks: who may use the proxy."""

from __future__ import annotations

import pytest

from forward_proxy.policy.clients import (
    DEFAULT_CLIENT_NETWORKS,
    ClientNetworks,
    client_address,
    comma_separated,
)

DEFAULTS = ClientNetworks.parse(DEFAULT_CLIENT_NETWORKS)


@pytest.mark.parametrize(
    ("address", "admitted"),
    [
        ("127.0.0.1", True),
        ("127.0.0.3", True),
        ("::1", True),
        ("::ffff:127.0.0.2", True),  # an IPv4 client seen through a dual-stack listener
        ("10.20.30.40", True),
        ("172.16.5.4", True),
        ("192.168.0.10", True),
        ("fd00::5", True),
        ("8.8.8.8", False),
        ("172.32.0.1", False),
        ("169.254.1.1", False),
        ("2606:4700::1111", False),
        ("::ffff:8.8.8.8", False),
    ],
)
def test_default_networks_are_loopback_and_private(address: str, admitted: bool) -> None:
    assert DEFAULTS.admits(address) is admitted


def test_a_narrow_list_admits_only_its_members() -> None:
    networks = ClientNetworks.parse(["127.0.0.2/32"])
    assert networks.admits("127.0.0.2")
    assert not networks.admits("127.0.0.3")
    assert not networks.admits("::1")


def test_client_address_normalises_mapped_and_zoned_addresses() -> None:
    assert str(client_address("::ffff:10.0.0.1")) == "10.0.0.1"
    assert str(client_address("fe80::1%eth0")) == "fe80::1"


@pytest.mark.parametrize("entries", [[], ["not-a-network"], ["10.0.0.0/40"]])
def test_bad_lists_are_explained(entries: list[str]) -> None:
    with pytest.raises(ValueError, match="allow_clients"):
        ClientNetworks.parse(entries)


def test_comma_separated_lists_for_the_launcher_flag() -> None:
    assert comma_separated(" 127.0.0.2/32, 10.0.0.0/8 ,") == ["127.0.0.2/32", "10.0.0.0/8"]
