"""Table-driven tests of the egress policy: literals, address classes, embedded IPv4, rules, precedence."""

from __future__ import annotations

import doctest
import types
from ipaddress import ip_address

import pytest
from hypothesis import given
from hypothesis import strategies as st

from forward_proxy.policy import clients, egress
from forward_proxy.policy.egress import (
    AddressClass,
    EgressRules,
    IPAddress,
    Rule,
    classify,
    log_fields,
    parse_ip_literal,
    parse_rules,
)

# host as written in a URL -> the address it denotes without DNS (None: a name)
LITERALS: list[tuple[str, str | None]] = [
    ("169.254.169.254", "169.254.169.254"),
    ("2852039166", "169.254.169.254"),  # decimal
    ("0xA9FEA9FE", "169.254.169.254"),  # hex
    ("0xa9fea9fe", "169.254.169.254"),
    ("0251.0376.0251.0376", "169.254.169.254"),  # octal parts
    ("0xA9.0xFE.0xA9.0xFE", "169.254.169.254"),  # hex parts
    ("169.254.43518", "169.254.169.254"),  # three parts: last one fills 16 bits
    ("169.16689662", "169.254.169.254"),  # two parts: last one fills 24 bits
    ("127.1", "127.0.0.1"),
    ("0177.0.0.1", "127.0.0.1"),
    ("0", "0.0.0.0"),
    ("0.0.0.0", "0.0.0.0"),
    ("10.0.0.1.", "10.0.0.1"),  # trailing dot
    ("[::1]", "::1"),
    ("::ffff:169.254.169.254", "::ffff:a9fe:a9fe"),
    ("[::ffff:a9fe:a9fe]", "::ffff:a9fe:a9fe"),
    ("fe80::1%eth0", "fe80::1"),  # zone id dropped
    ("FD00:EC2::254", "fd00:ec2::254"),
    ("localhost", None),
    ("model-api.internal", None),
    ("1.2.3.4.5", None),  # five parts: a name
    ("256.1.1.1", None),  # a leading part above 255
    ("1.2.3.256", None),
    ("4294967296", None),  # above 32 bits
    ("08.0.0.1", None),  # 8 is not an octal digit
    ("0x", None),
    ("1..2", None),
    ("0x1.example.com", None),
    ("::ffff:zz", None),
]


@pytest.mark.parametrize(("host", "expected"), LITERALS)
def test_parse_ip_literal(host: str, expected: str | None) -> None:
    parsed = parse_ip_literal(host)
    assert (str(parsed) if parsed is not None else None) == expected


# address -> class (IPv6 forms embedding IPv4 take the embedded address's class)
CLASSES: list[tuple[str, AddressClass]] = [
    ("0.0.0.0", AddressClass.UNSPECIFIED),
    ("0.1.2.3", AddressClass.UNSPECIFIED),
    ("::", AddressClass.UNSPECIFIED),
    ("169.254.169.254", AddressClass.METADATA),
    ("169.254.170.2", AddressClass.METADATA),
    ("100.100.100.200", AddressClass.METADATA),
    ("fd00:ec2::254", AddressClass.METADATA),
    ("fd20:ce::254", AddressClass.METADATA),
    ("169.254.1.1", AddressClass.LINK_LOCAL),
    ("fe80::1", AddressClass.LINK_LOCAL),
    ("febf::1", AddressClass.LINK_LOCAL),
    ("224.0.0.1", AddressClass.MULTICAST),
    ("ff02::1", AddressClass.MULTICAST),
    ("255.255.255.255", AddressClass.RESERVED),
    ("240.0.0.1", AddressClass.RESERVED),
    ("192.0.2.10", AddressClass.RESERVED),
    ("2001:db8::1", AddressClass.RESERVED),
    ("127.0.0.1", AddressClass.LOOPBACK),
    ("127.255.255.254", AddressClass.LOOPBACK),
    ("::1", AddressClass.LOOPBACK),
    ("10.1.2.3", AddressClass.PRIVATE),
    ("172.16.0.1", AddressClass.PRIVATE),
    ("172.31.255.255", AddressClass.PRIVATE),
    ("192.168.1.1", AddressClass.PRIVATE),
    ("100.64.0.1", AddressClass.PRIVATE),
    ("fd12:3456::1", AddressClass.PRIVATE),
    ("fec0::1", AddressClass.PRIVATE),
    ("172.32.0.1", AddressClass.GLOBAL),
    ("8.8.8.8", AddressClass.GLOBAL),
    ("2606:4700::1111", AddressClass.GLOBAL),
    # IPv6 forms that embed an IPv4 address
    ("::ffff:169.254.169.254", AddressClass.METADATA),  # IPv4-mapped
    ("::ffff:127.0.0.1", AddressClass.LOOPBACK),
    ("::ffff:8.8.8.8", AddressClass.GLOBAL),
    ("::169.254.169.254", AddressClass.METADATA),  # IPv4-compatible (deprecated)
    ("::10.0.0.1", AddressClass.PRIVATE),
    ("64:ff9b::a9fe:a9fe", AddressClass.METADATA),  # NAT64 well-known prefix
    ("64:ff9b::0.0.0.0", AddressClass.UNSPECIFIED),
    ("64:ff9b::808:808", AddressClass.GLOBAL),
    ("64:ff9b:1:a9fe:a9:fe00::", AddressClass.METADATA),  # NAT64 local-use /48 (RFC 6052 layout)
    ("2002:a9fe:a9fe::1", AddressClass.METADATA),  # 6to4
    ("2002:7f00:1::", AddressClass.LOOPBACK),
    ("2001:0:4136:e378:8000:63bf:5601:5601", AddressClass.METADATA),  # Teredo, client ~169.254.169.254
]


@pytest.mark.parametrize(("address", "expected"), CLASSES)
def test_classify(address: str, expected: AddressClass) -> None:
    assert classify(ip_address(address)).address_class is expected


def test_classify_names_the_embedding() -> None:
    found = classify(ip_address("64:ff9b::a9fe:a9fe"))
    assert (str(found.embedded), found.embedding) == ("169.254.169.254", "nat64")
    assert "nat64" in found.describe() and "metadata" in found.describe()


def test_classify_ignores_the_zone_id() -> None:
    assert classify(ip_address("fe80::1%eth0")).address_class is AddressClass.LINK_LOCAL


def _decide(rules: EgressRules, host: str, *addresses: str) -> tuple[bool, str]:
    resolved: list[IPAddress] = [ip_address(a) for a in addresses]
    literal = parse_ip_literal(host)
    if not resolved and literal is not None:
        resolved = [literal]
    decision = rules.decide(host, resolved)
    return decision.allowed, decision.rule


DEFAULT = EgressRules()

# (rules, host, resolved addresses (empty: the host is a literal), allowed, rule)
DECISIONS: list[tuple[EgressRules, str, tuple[str, ...], bool, str]] = [
    # defaults: metadata, link-local, unspecified and embedded forms denied; loopback/private/global allowed
    (DEFAULT, "169.254.169.254", (), False, "class:metadata"),
    (DEFAULT, "2852039166", (), False, "class:metadata"),
    (DEFAULT, "0xA9FEA9FE", (), False, "class:metadata"),
    (DEFAULT, "::ffff:169.254.169.254", (), False, "class:metadata"),
    (DEFAULT, "fd00:ec2::254", (), False, "class:metadata"),
    (DEFAULT, "169.254.1.2", (), False, "class:link_local"),
    (DEFAULT, "fe80::1", (), False, "class:link_local"),
    (DEFAULT, "0.0.0.0", (), False, "class:unspecified"),
    (DEFAULT, "::", (), False, "class:unspecified"),
    (DEFAULT, "127.0.0.1", (), True, "class:loopback"),
    (DEFAULT, "10.0.0.5", (), True, "class:private"),
    (DEFAULT, "8.8.8.8", (), True, "class:global"),
    # a hostname is judged by what it resolves to
    (DEFAULT, "metadata.google.internal", ("169.254.169.254",), False, "class:metadata"),
    (DEFAULT, "rebind.example", ("8.8.8.8", "169.254.169.254"), False, "class:metadata"),  # any denies
    (DEFAULT, "model-api.internal", ("10.0.0.5",), True, "class:private"),
    (DEFAULT, "localhost", ("::1", "127.0.0.1"), True, "class:loopback"),
    (EgressRules(deny_loopback=True), "localhost", ("127.0.0.1",), False, "class:loopback"),
    (EgressRules(deny_loopback=True), "127.0.0.1", (), False, "class:loopback"),
    (EgressRules(deny_loopback=True), "::ffff:127.0.0.1", (), False, "class:loopback"),
    (EgressRules(deny_private=True), "model-api.internal", ("10.0.0.5",), False, "class:private"),
    (EgressRules(deny_private=True), "127.0.0.1", (), True, "class:loopback"),
    # deny entries win over everything
    (
        EgressRules(deny=parse_rules(["api.example.com"], "d")),
        "API.example.com.",
        ("8.8.8.8",),
        False,
        "deny:api.example.com",
    ),
    (
        EgressRules(deny=parse_rules([".example.com"], "d")),
        "example.com",
        ("8.8.8.8",),
        False,
        "deny:.example.com",
    ),
    (
        EgressRules(deny=parse_rules([".example.com"], "d")),
        "a.b.example.com",
        ("8.8.8.8",),
        False,
        "deny:.example.com",
    ),
    (
        EgressRules(deny=parse_rules([".example.com"], "d")),
        "notexample.com",
        ("8.8.8.8",),
        True,
        "class:global",
    ),
    (
        EgressRules(deny=parse_rules(["*.example.com"], "d")),
        "example.com",
        ("8.8.8.8",),
        True,
        "class:global",
    ),
    (
        EgressRules(deny=parse_rules(["*.example.com"], "d")),
        "www.example.com",
        ("8.8.8.8",),
        False,
        "deny:*.example.com",
    ),
    (
        EgressRules(deny=parse_rules(["8.8.0.0/16"], "d")),
        "dns.google",
        ("8.8.8.8",),
        False,
        "deny:8.8.0.0/16",
    ),
    (EgressRules(deny=parse_rules(["10.0.0.0/8"], "d")), "::ffff:10.1.1.1", (), False, "deny:10.0.0.0/8"),
    (
        EgressRules(deny=parse_rules(["10.0.0.0/8"], "d"), allow=parse_rules(["10.0.0.0/8"], "a")),
        "10.1.1.1",
        (),
        False,
        "deny:10.0.0.0/8",
    ),
    # allow CIDRs override the address classes; allowed names never do
    (
        EgressRules(allow=parse_rules(["169.254.10.0/24"], "a")),
        "169.254.10.7",
        (),
        True,
        "allow:169.254.10.0/24",
    ),
    (
        EgressRules(allow=parse_rules(["169.254.10.0/24"], "a")),
        "169.254.169.254",
        (),
        False,
        "class:metadata",
    ),
    (
        EgressRules(allow=parse_rules(["127.0.0.1"], "a"), deny_loopback=True),
        "localhost",
        ("127.0.0.1",),
        True,
        "allow:127.0.0.1",
    ),
    (
        EgressRules(allow=parse_rules(["metadata.google.internal"], "a")),
        "metadata.google.internal",
        ("169.254.169.254",),
        False,
        "class:metadata",
    ),
    (
        EgressRules(allow=parse_rules([".corp.example"], "a"), deny_private=True),
        "db.corp.example",
        ("10.0.0.5",),
        False,
        "class:private",
    ),
    # allowlist mode
    (EgressRules(allow_only=True), "8.8.8.8", (), False, "not_allowlisted"),
    (
        EgressRules(allow=parse_rules([".example.com"], "a"), allow_only=True),
        "api.example.com",
        ("8.8.8.8",),
        True,
        "allow:.example.com",
    ),
    (
        EgressRules(allow=parse_rules([".example.com"], "a"), allow_only=True),
        "example.org",
        ("8.8.8.8",),
        False,
        "not_allowlisted",
    ),
    (
        EgressRules(allow=parse_rules(["8.8.8.0/24"], "a"), allow_only=True),
        "dns.google",
        ("8.8.8.8",),
        True,
        "allow:8.8.8.0/24",
    ),
    (
        EgressRules(allow=parse_rules(["8.8.8.0/24"], "a"), allow_only=True),
        "dns.google",
        ("8.8.8.8", "8.8.4.4"),  # one address outside the allowed CIDR
        False,
        "not_allowlisted",
    ),
    # a rule written as an odd IPv4 form means that address
    (EgressRules(deny=parse_rules(["0x7f000001"], "d")), "127.0.0.1", (), False, "deny:0x7f000001"),
    # nothing resolved
    (DEFAULT, "nothing.example", ("",), False, "unresolved"),
]


@pytest.mark.parametrize(("rules", "host", "addresses", "allowed", "rule"), DECISIONS)
def test_decide(rules: EgressRules, host: str, addresses: tuple[str, ...], allowed: bool, rule: str) -> None:
    resolved = tuple(a for a in addresses if a)
    if addresses == ("",):
        assert rules.decide(host, []).rule == rule
        return
    assert _decide(rules, host, *resolved) == (allowed, rule)


def test_decision_connects_to_the_first_ipv4_address() -> None:
    decision = DEFAULT.decide("localhost", [ip_address("::1"), ip_address("127.0.0.1")])
    assert str(decision.address) == "127.0.0.1"
    only_v6 = DEFAULT.decide("v6.example", [ip_address("2606:4700::1111"), ip_address("2606:4700::1001")])
    assert str(only_v6.address) == "2606:4700::1111"


def test_a_denial_names_the_denied_address() -> None:
    decision = DEFAULT.decide("rebind.example", [ip_address("8.8.8.8"), ip_address("169.254.169.254")])
    assert str(decision.address) == "169.254.169.254"


def test_check_connection_applies_deny_cidrs_and_classes_but_no_names() -> None:
    rules = EgressRules(deny=parse_rules(["8.8.8.8", ".example.com"], "d"), allow_only=True)
    assert not rules.check_connection(ip_address("8.8.8.8")).allowed
    assert not rules.check_connection(ip_address("169.254.169.254")).allowed
    assert rules.check_connection(ip_address("1.1.1.1")).allowed  # allow_only is a request-level rule


RULE_ERRORS = ["", "  ", "http://example.com", "*", "ex ample.com", "a*b.example.com", "10.0.0.0/33"]


@pytest.mark.parametrize("text", RULE_ERRORS)
def test_parse_rules_explains_bad_entries(text: str) -> None:
    with pytest.raises(ValueError, match="egress_allow"):
        parse_rules([text], "egress_allow")


def test_rule_kinds() -> None:
    assert Rule.parse("10.0.0.0/8").network is not None
    assert Rule.parse("[fd00::1]").network is not None
    assert Rule.parse("API.Example.COM").host == "api.example.com"
    assert Rule.parse(".example.com").include_apex
    assert not Rule.parse("*.example.com").include_apex


def test_log_fields_quote_values_with_spaces_and_skip_none() -> None:
    line = log_fields({"decision": "deny", "reason": 'IPv4 "link" local', "address": None, "port": 80})
    assert line == 'decision=deny reason="IPv4 \\"link\\" local" port=80'


@given(st.integers(min_value=0, max_value=2**32 - 1))
def test_every_decimal_and_hex_form_is_the_same_address(number: int) -> None:
    expected = ip_address(number)
    assert parse_ip_literal(str(number)) == expected
    assert parse_ip_literal(hex(number)) == expected
    dotted = str(expected).split(".")
    assert parse_ip_literal(".".join(oct(int(p)).replace("0o", "0") for p in dotted)) == expected


@given(st.ip_addresses(v=6))
def test_embedded_forms_never_escape_the_class_of_their_ipv4(address: IPAddress) -> None:
    found = classify(address)
    if found.embedded is not None:
        assert found.address_class is classify(found.embedded).address_class


@pytest.mark.parametrize("module", [egress, clients])
def test_docstring_examples(module: types.ModuleType) -> None:
    assert doctest.testmod(module).failed == 0
