"""Start `forward-proxy run` on an ephemeral loopback port with its own cache directory.

    proxy = start_proxy(tmp_path, "--cache-ttl", "30s")
    try:
        requests.post(upstream.url("/v1/embeddings"), json={...}, proxies=proxy.proxies)
    finally:
        proxy.stop()

or as a context manager: `with start_proxy(tmp_path) as proxy: ...`. `start_proxy` returns once the proxy
printed its "listening on" line (servers up, cache opened), and stops it by PID on failure.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import requests

from tests.support.processes import REPO, ManagedProcess, console_script, free_port

READY_LINE = "forward-proxy listening on"


@dataclass
class RunningProxy:
    process: ManagedProcess
    host: str
    port: int
    cache_dir: Path

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def proxies(self) -> dict[str, str]:
        """For `requests(..., proxies=proxy.proxies)`."""
        return {"http": self.url, "https": self.url}

    @property
    def env(self) -> dict[str, str]:
        """Environment variables that send a child process's HTTP through this proxy."""
        return {
            "HTTP_PROXY": self.url,
            "HTTPS_PROXY": self.url,
            "http_proxy": self.url,
            "https_proxy": self.url,
        }

    def session(self) -> requests.Session:
        """A requests session that goes through this proxy whatever the environment says."""
        session = requests.Session()
        session.trust_env = False
        session.proxies.update(self.proxies)
        return session

    def log(self) -> str:
        return self.process.log()

    def stop(self, sig: int = signal.SIGTERM) -> int | None:
        return self.process.stop(sig)

    def __enter__(self) -> RunningProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def proxy_command() -> str:
    """The `forward-proxy` of the proxy environment, also when the tests run in `.venv-model` (no mitmproxy)."""
    preferred = REPO / ".venv" / "bin" / "forward-proxy"
    return str(preferred) if preferred.exists() else console_script("forward-proxy")


def start_proxy(
    tmp_path: Path,
    *extra_args: str,
    cache_dir: Path | None = None,
    env: dict[str, str] | None = None,
    host: str = "127.0.0.1",
    timeout: float = 60.0,
    wrapper: Sequence[str] = (),
) -> RunningProxy:
    """Run `forward-proxy run --listen-host HOST --listen-port <free> --cache-dir DIR *extra_args`.

    `wrapper` goes before the command, e.g. `("prlimit", "--fsize=262144")` to make its disk "full"."""
    cache_dir = cache_dir if cache_dir is not None else tmp_path / "cache"
    port = free_port(host)
    argv = [
        *wrapper,
        proxy_command(),
        "run",
        "--listen-host",
        host,
        "--listen-port",
        str(port),
        "--cache-dir",
        str(cache_dir),
        *extra_args,
    ]
    log_path = tmp_path / f"forward-proxy-{port}.log"
    process = ManagedProcess(argv, log_path, env).start()
    proxy = RunningProxy(process, host, port, cache_dir)
    try:
        _wait_until_ready(proxy, timeout)
    except BaseException:
        process.stop()
        raise
    return proxy


def _wait_until_ready(proxy: RunningProxy, timeout: float) -> None:
    assert proxy.process.proc is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if READY_LINE in proxy.log():
            return
        if proxy.process.proc.poll() is not None:
            raise RuntimeError(
                f"forward-proxy exited with {proxy.process.proc.returncode} before listening:\n{proxy.log()}"
            )
        time.sleep(0.05)
    raise TimeoutError(f"forward-proxy did not listen within {timeout}s:\n{proxy.log()}")
