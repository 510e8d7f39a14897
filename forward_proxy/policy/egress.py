"""Where the proxy may connect: address classes, allow/deny rules and one decision per destination.

Pure code: no sockets, no DNS, no mitmproxy. The addon (`forward_proxy.policy.addon.EgressGuard`) resolves
a host, asks `EgressRules.decide` and connects only to the address the decision names.

Every address first gets a class from `RANGES` (most specific range wins). IPv6 forms that embed an
IPv4 address (IPv4-mapped, IPv4-compatible, NAT64, 6to4, Teredo) take the class of the embedded address,
so `::ffff:169.254.169.254` is as denied as `169.254.169.254`.

>>> rules = EgressRules()
>>> rules.decide("2852039166", [parse_ip_literal("2852039166")]).rule
'class:metadata'
>>> rules.decide("localhost", [parse_ip_literal("127.0.0.1")]).allowed
True
>>> EgressRules(deny_loopback=True).decide("localhost", [parse_ip_literal("127.0.0.1")]).rule
'class:loopback'

Precedence, first match wins (the privacy page in docs/ has the same table):

1. `deny` entries: a host, a domain or a CIDR that names the destination (any of its addresses) -> deny
2. for each address: an `allow` CIDR that contains it -> that address is allowed whatever its class
3. address classes denied always (unspecified, metadata, link-local, multicast, reserved) -> deny
4. loopback / private when `deny_loopback` / `deny_private` -> deny
5. with `allow_only`: a host/domain `allow` entry that names the destination, or `allow` CIDRs for all of
   its addresses -> allow, else deny
6. otherwise -> allow

Host and domain entries never allow an address that step 3 or 4 denies: a name is only as trustworthy as
its DNS answer.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_network

IPAddress = IPv4Address | IPv6Address
IPNetwork = IPv4Network | IPv6Network


class AddressClass(enum.Enum):
    UNSPECIFIED = "unspecified"
    METADATA = "metadata"
    LINK_LOCAL = "link_local"
    MULTICAST = "multicast"
    RESERVED = "reserved"
    LOOPBACK = "loopback"
    PRIVATE = "private"
    GLOBAL = "global"


ALWAYS_DENIED = frozenset(
    {
        AddressClass.UNSPECIFIED,
        AddressClass.METADATA,
        AddressClass.LINK_LOCAL,
        AddressClass.MULTICAST,
        AddressClass.RESERVED,
    }
)

# (network, class, why) - the table the docs repeat. Order does not matter: the longest prefix wins.
RANGES: tuple[tuple[str, AddressClass, str], ...] = (
    ("0.0.0.0/8", AddressClass.UNSPECIFIED, "'this network' (0.0.0.0 reaches the proxy host itself)"),
    ("::/128", AddressClass.UNSPECIFIED, "the unspecified IPv6 address"),
    ("169.254.169.254/32", AddressClass.METADATA, "cloud instance metadata (AWS, GCP, Azure, OCI)"),
    ("169.254.170.2/32", AddressClass.METADATA, "AWS ECS task metadata"),
    ("100.100.100.200/32", AddressClass.METADATA, "Alibaba Cloud instance metadata"),
    ("fd00:ec2::254/128", AddressClass.METADATA, "AWS instance metadata over IPv6"),
    ("fd20:ce::254/128", AddressClass.METADATA, "GCP instance metadata over IPv6"),
    ("169.254.0.0/16", AddressClass.LINK_LOCAL, "IPv4 link-local"),
    ("fe80::/10", AddressClass.LINK_LOCAL, "IPv6 link-local"),
    ("224.0.0.0/4", AddressClass.MULTICAST, "IPv4 multicast"),
    ("ff00::/8", AddressClass.MULTICAST, "IPv6 multicast"),
    ("240.0.0.0/4", AddressClass.RESERVED, "reserved, including the broadcast address"),
    ("192.0.0.0/24", AddressClass.RESERVED, "IETF protocol assignments"),
    ("192.0.2.0/24", AddressClass.RESERVED, "documentation (TEST-NET-1)"),
    ("198.51.100.0/24", AddressClass.RESERVED, "documentation (TEST-NET-2)"),
    ("203.0.113.0/24", AddressClass.RESERVED, "documentation (TEST-NET-3)"),
    ("198.18.0.0/15", AddressClass.RESERVED, "benchmarking"),
    ("2001:db8::/32", AddressClass.RESERVED, "IPv6 documentation"),
    ("100::/64", AddressClass.RESERVED, "IPv6 discard-only"),
    ("127.0.0.0/8", AddressClass.LOOPBACK, "IPv4 loopback"),
    ("::1/128", AddressClass.LOOPBACK, "IPv6 loopback"),
    ("10.0.0.0/8", AddressClass.PRIVATE, "private (RFC 1918)"),
    ("172.16.0.0/12", AddressClass.PRIVATE, "private (RFC 1918)"),
    ("192.168.0.0/16", AddressClass.PRIVATE, "private (RFC 1918)"),
    ("100.64.0.0/10", AddressClass.PRIVATE, "carrier-grade NAT shared space"),
    ("fc00::/7", AddressClass.PRIVATE, "IPv6 unique local"),
    ("fec0::/10", AddressClass.PRIVATE, "IPv6 site-local (deprecated)"),
)

_TABLE: tuple[tuple[IPNetwork, AddressClass, str], ...] = tuple(
    sorted(
        ((ip_network(cidr), cls, why) for cidr, cls, why in RANGES),
        key=lambda row: row[0].prefixlen,
        reverse=True,
    )
)

_NAT64_WELL_KNOWN = IPv6Network("64:ff9b::/96")
_NAT64_LOCAL = IPv6Network("64:ff9b:1::/48")
_IPV4_COMPATIBLE = IPv6Network("::/96")


@dataclass(frozen=True)
class Classification:
    """The class of one address, and where an embedded IPv4 address came from."""

    address: IPAddress
    address_class: AddressClass
    why: str
    embedded: IPv4Address | None = None
    embedding: str | None = None  # "ipv4_mapped", "nat64", ...

    def describe(self) -> str:
        if self.embedded is None:
            return self.why
        return f"{self.why}, embedded as {self.embedding} in {self.address}"


def embedded_ipv4(address: IPv6Address) -> tuple[IPv4Address, str] | None:
    """The IPv4 address an IPv6 address carries (and the form), if it is one of the embedding forms."""
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped, "ipv4_mapped"
    packed = address.packed
    if address in _NAT64_WELL_KNOWN:
        return IPv4Address(packed[12:]), "nat64"
    if address in _NAT64_LOCAL:  # RFC 6052 /48 layout: octets 6-7 and 9-10, octet 8 is zero
        return IPv4Address(packed[6:8] + packed[9:11]), "nat64"
    if address.sixtofour is not None:
        return address.sixtofour, "6to4"
    if address.teredo is not None:
        return address.teredo[1], "teredo"
    if address in _IPV4_COMPATIBLE and int(address) > 1:  # not :: or ::1, which are classes of their own
        return IPv4Address(packed[12:]), "ipv4_compatible"
    return None


def classify(address: IPAddress) -> Classification:
    """The class of an address; IPv6 forms that embed IPv4 take the embedded address's class."""
    if isinstance(address, IPv6Address):
        if address.scope_id:
            address = IPv6Address(address.compressed.split("%", 1)[0])
        found = embedded_ipv4(address)
        if found is not None:
            inner = classify(found[0])
            return Classification(address, inner.address_class, inner.why, found[0], found[1])
    for network, address_class, why in _TABLE:
        if address.version == network.version and address in network:
            return Classification(address, address_class, why)
    return Classification(address, AddressClass.GLOBAL, "public address")


def parse_ip_literal(host: str) -> IPAddress | None:
    """The address a host string denotes without DNS, or None for a name.

    Accepts what the C library's resolver accepts, so nothing reaches DNS that would connect to a literal
    the policy did not see: dotted IPv4 with one to four parts in decimal, octal (leading 0) or hex (0x),
    IPv6 with or without brackets and zone id.

    >>> parse_ip_literal("0xA9FEA9FE"), parse_ip_literal("0251.0376.0251.0376"), parse_ip_literal("127.1")
    (IPv4Address('169.254.169.254'), IPv4Address('169.254.169.254'), IPv4Address('127.0.0.1'))
    >>> parse_ip_literal("[::ffff:a9fe:a9fe]"), parse_ip_literal("model-api.internal")
    (IPv6Address('::ffff:a9fe:a9fe'), None)
    """
    text = host.strip().lower()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    if ":" in text:
        try:
            return IPv6Address(text.split("%", 1)[0])
        except ValueError:
            return None
    text = text.removesuffix(".")
    return _parse_inet_aton(text)


def _parse_inet_aton(text: str) -> IPv4Address | None:
    parts = text.split(".")
    if not 1 <= len(parts) <= 4:
        return None
    values: list[int] = []
    for part in parts:
        value = _parse_inet_aton_part(part)
        if value is None:
            return None
        values.append(value)
    *leading, last = values
    if any(value > 0xFF for value in leading) or last >= 1 << (8 * (5 - len(values))):
        return None
    number = last
    for position, value in enumerate(leading):
        number |= value << (8 * (3 - position))
    return IPv4Address(number)


def _parse_inet_aton_part(part: str) -> int | None:
    if part.startswith("0x"):
        digits, base = part[2:], 16
    elif part.startswith("0") and len(part) > 1:
        digits, base = part[1:], 8
    else:
        digits, base = part, 10
    if not digits or not all(c in "0123456789abcdef"[:base] for c in digits):
        return None
    return int(digits, base)


def normalize_host(host: str) -> str:
    return host.strip().lower().removesuffix(".")


@dataclass(frozen=True)
class Rule:
    """One `egress_allow` / `egress_deny` entry: an exact host, a domain, or a network.

    - `api.example.com`      that host only
    - `.example.com`         example.com and every name under it
    - `*.example.com`        every name under example.com, not example.com itself
    - `10.1.0.0/16`, `10.1.2.3`, `fd00::/8`   addresses (also when embedded in IPv6)
    """

    text: str
    host: str | None = None
    suffix: str | None = None  # ".example.com"
    include_apex: bool = False
    network: IPNetwork | None = None

    @classmethod
    def parse(cls, text: str) -> Rule:
        entry = text.strip()
        if not entry:
            raise ValueError("an empty entry; remove it")
        try:
            return cls(text=entry, network=ip_network(entry.strip("[]"), strict=False))
        except ValueError:
            pass
        name = normalize_host(entry)
        if name.startswith("*."):
            return cls(text=entry, suffix=name[1:])
        if name.startswith("."):
            return cls(text=entry, suffix=name, include_apex=True)
        if "*" in name or "/" in name or ":" in name or " " in name:
            raise ValueError(
                f"{entry!r} is neither a host (api.example.com), a domain (.example.com, *.example.com) "
                "nor a CIDR (10.0.0.0/8, fd00::/8)"
            )
        literal = parse_ip_literal(name)
        if literal is not None:  # "2852039166" as a rule means the address, like in a URL
            return cls(text=entry, network=ip_network(literal))
        return cls(text=entry, host=name)

    def matches_name(self, host: str) -> bool:
        name = normalize_host(host)
        if self.host is not None:
            return name == self.host
        if self.suffix is not None:
            return name.endswith(self.suffix) or (self.include_apex and name == self.suffix[1:])
        return False

    def matches_address(self, address: IPAddress) -> bool:
        if self.network is None:
            return False
        candidates: list[IPAddress] = [address]
        if isinstance(address, IPv6Address) and (found := embedded_ipv4(address)) is not None:
            candidates.append(found[0])
        return any(c.version == self.network.version and c in self.network for c in candidates)


def parse_rules(entries: Iterable[str], option: str) -> tuple[Rule, ...]:
    rules = []
    for entry in entries:
        try:
            rules.append(Rule.parse(entry))
        except ValueError as exc:
            raise ValueError(f"{option}: {exc}") from None
    return tuple(rules)


@dataclass(frozen=True)
class Decision:
    """The verdict for one destination, the rule that decided it and the address to connect to."""

    allowed: bool
    rule: str  # "deny:.corp.example", "allow:10.1.0.0/16", "class:metadata", "not_allowlisted", ...
    reason: str
    address: IPAddress | None  # the address to connect to (allowed) or the one that was denied

    @property
    def verdict(self) -> str:
        return "allow" if self.allowed else "deny"


@dataclass(frozen=True)
class EgressRules:
    """The whole egress policy; `decide` is the only entry point."""

    allow: tuple[Rule, ...] = field(default=())
    deny: tuple[Rule, ...] = field(default=())
    deny_private: bool = False
    deny_loopback: bool = False
    allow_only: bool = False

    def decide(self, host: str, addresses: Sequence[IPAddress]) -> Decision:
        """Decide for `host` that resolved to `addresses` (one address for a literal)."""
        if not addresses:
            return Decision(False, "unresolved", f"{host} has no address", None)
        denied_name = self.deny_by_name(host)
        if denied_name is not None:
            return denied_name
        for rule in self.deny:
            for address in addresses:
                if rule.matches_address(address):
                    return Decision(False, f"deny:{rule.text}", f"{address} is in egress_deny", address)
        allowed_by_cidr = True
        for address in addresses:
            verdict = self.check_address(address)
            if verdict is not None and not verdict.allowed:
                return verdict
            allowed_by_cidr = allowed_by_cidr and verdict is not None
        chosen = preferred_address(addresses)
        if allowed_by_cidr:
            entry = next(rule for rule in self.allow if rule.matches_address(chosen))
            return Decision(True, f"allow:{entry.text}", f"{chosen} is in egress_allow", chosen)
        if self.allow_only:
            entry_by_name = next((rule for rule in self.allow if rule.matches_name(host)), None)
            if entry_by_name is None:
                return Decision(
                    False, "not_allowlisted", f"{host} is not in egress_allow (egress_allow_only)", chosen
                )
            return Decision(True, f"allow:{entry_by_name.text}", f"{host} is in egress_allow", chosen)
        found = classify(chosen)
        return Decision(True, f"class:{found.address_class.value}", found.describe(), chosen)

    def deny_by_name(self, host: str) -> Decision | None:
        """Step 1 for names: a denied name is refused before anyone asks DNS about it."""
        for rule in self.deny:
            if rule.matches_name(host):
                return Decision(False, f"deny:{rule.text}", f"{host} is in egress_deny", None)
        return None

    def check_address(self, address: IPAddress) -> Decision | None:
        """The address-only part of the policy (steps 2-4): an allow by CIDR, a denial, or None (no objection)."""
        for rule in self.allow:
            if rule.matches_address(address):
                return Decision(True, f"allow:{rule.text}", f"{address} is in egress_allow", address)
        found = classify(address)
        cls = found.address_class
        denied = (
            cls in ALWAYS_DENIED
            or (cls is AddressClass.LOOPBACK and self.deny_loopback)
            or (cls is AddressClass.PRIVATE and self.deny_private)
        )
        if denied:
            return Decision(False, f"class:{cls.value}", found.describe(), address)
        return None

    def check_connection(self, address: IPAddress) -> Decision:
        """Deny-list CIDRs plus `check_address`: what must hold for any connection, whoever opens it."""
        for rule in self.deny:
            if rule.matches_address(address):
                return Decision(False, f"deny:{rule.text}", f"{address} is in egress_deny", address)
        verdict = self.check_address(address)
        if verdict is not None:
            return verdict
        found = classify(address)
        return Decision(True, f"class:{found.address_class.value}", found.describe(), address)


def preferred_address(addresses: Sequence[IPAddress]) -> IPAddress:
    """The address to connect to: the first IPv4 one in resolver order, else the first one.

    IPv4 first because "localhost" often resolves to ::1 first while local servers listen on 127.0.0.1.
    """
    return next((a for a in addresses if a.version == 4), addresses[0])


def log_fields(fields: Mapping[str, object]) -> str:
    """`key=value` pairs for one canonical log line; values with spaces are quoted."""
    parts = []
    for key, value in fields.items():
        if value is None:
            continue
        text = str(value)
        if not text or any(c in text for c in ' "='):
            text = '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
        parts.append(f"{key}={text}")
    return " ".join(parts)
