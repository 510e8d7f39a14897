"""Who may use the proxy: a list of client networks. Pure code, no mitmproxy.

>>> networks = ClientNetworks.parse(["127.0.0.2/32", "10.0.0.0/8"])
>>> networks.admits("127.0.0.2"), networks.admits("127.0.0.3"), networks.admits("::ffff:10.1.2.3")
(True, False, True)
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address, ip_address, ip_network

from forward_proxy.policy.egress import IPAddress, IPNetwork

# Loopback and the private ranges: the machines of the organisation the proxy serves.
DEFAULT_CLIENT_NETWORKS: tuple[str, ...] = (
    "127.0.0.0/8",
    "::1/128",
    "10.0.0.0/8",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "fc00::/7",
)


def client_address(host: str) -> IPAddress:
    """A peer address as the policy sees it: zone id dropped, IPv4-mapped IPv6 as plain IPv4.

    A dual-stack listener reports IPv4 clients as `::ffff:a.b.c.d`; they are the same client.
    """
    address = ip_address(host.split("%", 1)[0])
    if isinstance(address, IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


@dataclass(frozen=True)
class ClientNetworks:
    networks: tuple[IPNetwork, ...]

    @classmethod
    def parse(cls, entries: Iterable[str]) -> ClientNetworks:
        networks = []
        for entry in entries:
            try:
                networks.append(ip_network(entry.strip(), strict=False))
            except ValueError:
                raise ValueError(
                    f"allow_clients: {entry!r} is not a network; write a CIDR such as 10.0.0.0/8 or "
                    "127.0.0.2/32"
                ) from None
        if not networks:
            raise ValueError(
                "allow_clients is empty, so nobody could use the proxy; list the client networks, "
                "or 0.0.0.0/0 and ::/0 to admit everyone"
            )
        return cls(tuple(networks))

    def admits(self, host: str | IPAddress) -> bool:
        address = host if isinstance(host, IPv4Address | IPv6Address) else client_address(host)
        return any(address.version == n.version and address in n for n in self.networks)


def comma_separated(text: str) -> list[str]:
    """`--allow-clients 127.0.0.2/32,10.0.0.0/8` as the option's list."""
    return [entry.strip() for entry in text.split(",") if entry.strip()]
