"""Start a real `redis-server` on an ephemeral loopback port, with nothing persisted, and stop it by PID.

    with RedisServer(tmp_path) as server:
        store, counters = open_redis(server.url)
        ...
        server.stop()      # Redis goes away ...
        server.start()     # ... and comes back on the same port, empty

`RedisServer(..., cluster=True)` starts a one-node Redis Cluster that owns every hash slot, and
`Sentinel(tmp_path, server)` a sentinel watching `server` as the master named `mymaster`, so the cluster and
sentinel URL forms run against the real thing too. Tests that use these carry `@pytest.mark.redis` and are
skipped where no `redis-server` binary is installed (`scripts/install-system.sh` installs it).
"""

from __future__ import annotations

import shutil
import socket
import time
from pathlib import Path

import pytest

from tests.support.processes import ManagedProcess, free_port, wait_for_port

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"


def redis_available() -> bool:
    return Path(REDIS_SERVER).exists()


requires_redis = pytest.mark.skipif(not redis_available(), reason="redis-server is not installed")


def command(port: int, *args: str, timeout: float = 5.0) -> bytes:
    """Send one command in RESP to 127.0.0.1:`port` and return the raw reply (no client library needed)."""
    payload = f"*{len(args)}\r\n".encode() + b"".join(
        f"${len(arg.encode())}\r\n".encode() + arg.encode() + b"\r\n" for arg in args
    )
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(payload)
        reply = sock.recv(65536)
    return reply


class RedisServer:
    """One `redis-server` process; `stop()` and `start()` again keep its port (data is not kept)."""

    def __init__(
        self,
        directory: Path,
        *extra: str,
        port: int | None = None,
        cluster: bool = False,
        tls_certificate: Path | None = None,
        name: str = "redis",
    ) -> None:
        """`tls_certificate`: one PEM file with certificate and key (`tests.support.upstream.
        self_signed_certificate`); the server then speaks TLS only, and `url` is a rediss:// URL."""
        self.directory = directory / name
        self.port = port or free_port()
        self.cluster = cluster
        self.tls_certificate = tls_certificate
        self.bus_port = free_port() if cluster else 0
        self.extra = extra
        self.process: ManagedProcess | None = None

    @property
    def url(self) -> str:
        if self.tls_certificate is not None:
            return f"rediss://127.0.0.1:{self.port}/0?ssl_ca_certs={self.tls_certificate}"
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def cluster_url(self) -> str:
        return f"redis+cluster://127.0.0.1:{self.port}"

    def argv(self) -> list[str]:
        if self.tls_certificate is None:
            ports = ["--port", str(self.port)]
        else:
            pem = str(self.tls_certificate)
            ports = ["--port", "0", "--tls-port", str(self.port), "--tls-auth-clients", "no"]
            ports += ["--tls-cert-file", pem, "--tls-key-file", pem, "--tls-ca-cert-file", pem]
        argv = [
            REDIS_SERVER,
            *ports,
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(self.directory),
            "--daemonize",
            "no",
            "--protected-mode",
            "yes",
        ]
        if self.cluster:
            argv += ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"]
            argv += ["--cluster-port", str(self.bus_port)]  # else port + 10000, which may not exist
        return argv + list(self.extra)

    def start(self, timeout: float = 30.0) -> RedisServer:
        self.directory.mkdir(parents=True, exist_ok=True)
        if self.cluster:  # a fresh cluster each time: the slots are assigned below
            (self.directory / "nodes.conf").unlink(missing_ok=True)
        self.process = ManagedProcess(self.argv(), self.directory / "redis.log").start()
        try:
            wait_for_port("127.0.0.1", self.port, timeout, proc=self.process.proc)
            if self.cluster:
                self._own_every_slot(timeout)
        except BaseException:
            self.process.kill()
            raise
        return self

    def stop(self) -> None:
        """Stop by PID (SIGTERM, then SIGKILL) and wait until the port no longer accepts."""
        if self.process is not None:
            self.process.stop()
            self.process = None

    def kill(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process = None

    def command(self, *args: str) -> bytes:
        return command(self.port, *args)

    def log(self) -> str:
        return self.process.log() if self.process is not None else ""

    def _own_every_slot(self, timeout: float) -> None:
        assert self.command("CLUSTER", "ADDSLOTSRANGE", "0", "16383").startswith(b"+OK")
        deadline = time.monotonic() + timeout
        while b"cluster_state:ok" not in self.command("CLUSTER", "INFO"):
            if time.monotonic() > deadline:
                raise TimeoutError(f"the one-node cluster on {self.port} did not become ready")
            time.sleep(0.05)

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class Sentinel:
    """A sentinel (`redis-server --sentinel`) monitoring `master` as `mymaster`."""

    def __init__(self, directory: Path, master: RedisServer, service: str = "mymaster") -> None:
        self.directory = directory / "sentinel"
        self.master = master
        self.service = service
        self.port = free_port()
        self.process: ManagedProcess | None = None

    @property
    def url(self) -> str:
        return f"redis+sentinel://127.0.0.1:{self.port}/{self.service}/0"

    def start(self, timeout: float = 30.0) -> Sentinel:
        self.directory.mkdir(parents=True, exist_ok=True)
        config = self.directory / "sentinel.conf"  # sentinel rewrites its config file, so it gets its own
        config.write_text(
            f"port {self.port}\nbind 127.0.0.1\ndir {self.directory}\n"
            f"sentinel monitor {self.service} 127.0.0.1 {self.master.port} 1\n"
        )
        self.process = ManagedProcess(
            [REDIS_SERVER, str(config), "--sentinel"], self.directory / "sentinel.log"
        ).start()
        try:
            wait_for_port("127.0.0.1", self.port, timeout, proc=self.process.proc)
            deadline = time.monotonic() + timeout
            while str(self.master.port).encode() not in command(
                self.port, "SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.service
            ):
                if time.monotonic() > deadline:
                    raise TimeoutError("the sentinel did not learn its master")
                time.sleep(0.05)
        except BaseException:
            self.process.kill()
            raise
        return self

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()
            self.process = None

    def __enter__(self) -> Sentinel:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
