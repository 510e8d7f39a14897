"""A real DNS server on a loopback address, and a wrapper that makes one child process resolve through it.

The proxy resolves names with the C library (`getaddrinfo`), which reads /etc/resolv.conf. A test cannot
change that file for the machine, so `resolving_through(nameserver, directory)` gives a `start_proxy`
wrapper that runs the proxy in a mount namespace of its own (`unshare`) where a private resolv.conf is
bind-mounted over /etc/resolv.conf, naming only this server. Everything else (the network, /etc/hosts) is
the machine's. The answers are real UDP DNS answers with a TTL of 0, so a name can change its address
from one question to the next, as a rebinding attacker's server does:

    with Nameserver() as dns:
        dns.answer("rebind.test", ["127.0.0.2", "127.0.0.3"])  # the first A question, then every later one
        with start_proxy(tmp_path, wrapper=resolving_through(dns, tmp_path)) as proxy:
            ...
        dns.questions("rebind.test")  # how many A questions it was asked

Needs port 53 on a loopback address (root, or CAP_NET_BIND_SERVICE) and `unshare` with mount namespaces;
a test that uses it is skipped where either is missing.
"""

from __future__ import annotations

import os
import random
import shutil
import socket
import subprocess
import threading
from collections import Counter
from ipaddress import IPv4Address
from pathlib import Path

import pytest
from mitmproxy import dns

A, AAAA = 1, 28
NXDOMAIN = 3


class Nameserver:
    """Answers A questions for the names it was told about, one address per question in turn (the last one
    repeats); AAAA questions for them get no address; every other name does not exist."""

    def __init__(self) -> None:
        self.address = ""
        self._answers: dict[str, list[IPv4Address]] = {}
        self._asked: Counter[tuple[str, int]] = Counter()
        self._lock = threading.Lock()
        self._socket: socket.socket | None = None
        self._thread: threading.Thread | None = None

    def answer(self, name: str, addresses: list[str]) -> None:
        with self._lock:
            self._answers[name.lower()] = [IPv4Address(address) for address in addresses]

    def questions(self, name: str, qtype: int = A) -> int:
        with self._lock:
            return self._asked[(name.lower(), qtype)]

    def start(self) -> Nameserver:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        for _ in range(20):  # a random 127.53.x.y: not the 127.0.0.53 of systemd-resolved, nor a neighbour's
            address = f"127.53.{random.randrange(256)}.{random.randrange(1, 255)}"
            try:
                sock.bind((address, 53))
                break
            except PermissionError:
                sock.close()
                pytest.skip("a DNS server on port 53 needs root or CAP_NET_BIND_SERVICE")
            except OSError:
                continue
        else:
            sock.close()
            raise RuntimeError("no free loopback address for a DNS server on port 53")
        sock.settimeout(0.1)
        self.address, self._socket = address, sock
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        sock, self._socket = self._socket, None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        if sock is not None:
            sock.close()

    def __enter__(self) -> Nameserver:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _serve(self) -> None:
        while (sock := self._socket) is not None:
            try:
                data, client = sock.recvfrom(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                query = dns.DNSMessage.unpack(data)
            except Exception:  # not DNS: no answer, as a server would
                continue
            sock.sendto(self._reply(query).packed, client)

    def _reply(self, query: dns.DNSMessage) -> dns.DNSMessage:
        question = query.question
        if question is None:
            return query.fail(NXDOMAIN)
        name = question.name.lower().rstrip(".")
        with self._lock:
            self._asked[(name, question.type)] += 1
            addresses = self._answers.get(name)
            if addresses is None:
                return query.fail(NXDOMAIN)
            if question.type != A:
                return query.succeed([])  # the name exists, without an address of that kind
            turn = self._asked[(name, A)] - 1
            chosen = addresses[min(turn, len(addresses) - 1)]
        return query.succeed([dns.ResourceRecord.A(question.name, chosen, ttl=0)])


def resolving_through(nameserver: Nameserver, directory: Path) -> tuple[str, ...]:
    """A `start_proxy(..., wrapper=...)` that makes the child resolve names through `nameserver` only."""
    unshare = shutil.which("unshare")
    if unshare is None:
        pytest.skip("unshare (util-linux) is missing: no private resolv.conf for the proxy")
    namespace = (unshare, "--mount") if os.geteuid() == 0 else (unshare, "--mount", "--map-root-user")
    probe = subprocess.run([*namespace, "true"], capture_output=True, timeout=10)
    if probe.returncode != 0:
        pytest.skip(f"cannot make a mount namespace: {probe.stderr.decode(errors='replace').strip()}")
    resolv = directory / "resolv.conf"
    directory.mkdir(parents=True, exist_ok=True)
    resolv.write_text(f"nameserver {nameserver.address}\noptions attempts:1 timeout:1\n")
    script = 'mount --bind "$0" /etc/resolv.conf && exec "$@"'
    return (*namespace, "sh", "-c", script, str(resolv))
