"""Helpers for the tests that run several real proxies: `--workers` processes, a fleet on one Redis.

The worker processes of `forward-proxy run --workers N` are found through /proc (children of the
supervisor's PID), and which worker accepted a client connection through the socket inodes of
/proc/<pid>/fd and /proc/net/tcp, so a test can tell that both workers served.
"""

from __future__ import annotations

import json
import os
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import requests

from tests.support.proxy import READY_LINE, RunningProxy, start_proxy

ESTABLISHED = "01"


def start_workers(tmp_path: Path, count: int, *args: str, **kwargs: Any) -> RunningProxy:
    """`forward-proxy run --workers COUNT *args`, returned once every worker printed its start-up line."""
    proxy = start_proxy(tmp_path, "--workers", str(count), *args, **kwargs)
    try:
        wait_until(lambda: proxy.log().count(READY_LINE) >= count, 60, lambda: proxy.log())
    except BaseException:
        proxy.stop()
        raise
    return proxy


def wait_until(condition: Callable[[], bool], timeout: float, describe: Callable[[], str] = str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"not reached within {timeout}s: {describe()}")
        time.sleep(0.05)


def children(pid: int) -> list[int]:
    """PIDs whose parent is `pid`."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == pid:
            found.append(int(entry.name))
    return found


def worker_pids(supervisor: int) -> list[int]:
    """The proxy workers among the supervisor's children (not multiprocessing's resource tracker)."""
    return [pid for pid in children(supervisor) if b"spawn_main" in _cmdline(pid)]


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def connection_owners(port: int, pids: list[int]) -> dict[int, int]:
    """How many established connections to local `port` each of `pids` holds."""
    inodes = {}
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local_port = int(fields[1].rsplit(":", 1)[1], 16)
        if local_port == port and fields[3] == ESTABLISHED:
            inodes[fields[9]] = local_port
    owners = dict.fromkeys(pids, 0)
    for pid in pids:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:[") and target[8:-1] in inodes:
                owners[pid] += 1
    return owners


def embed(session: requests.Session, proxy: RunningProxy, url: str, text: str) -> requests.Response:
    return session.post(url, json={"input": text, "model": "minilm"}, proxies=proxy.proxies, timeout=30)


def fresh_session() -> requests.Session:
    session = requests.Session()
    session.trust_env = False
    return session


def report(admin_port: int) -> dict[str, Any]:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(f"http://127.0.0.1:{admin_port}/stats", timeout=5) as response:
        result: dict[str, Any] = json.loads(response.read())
    return result


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""
