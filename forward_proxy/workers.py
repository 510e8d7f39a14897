"""`forward-proxy run --workers N`: N proxy processes behind one listening port.

Each worker is a whole `forward-proxy run` (mitmproxy and the addon list) in a process of its own,
listening on the same address with `SO_REUSEPORT`, so the Linux kernel spreads new client connections
over the workers and hit throughput grows with the cores they get. They share the cache through the
backend: diskcache in the cache directory (safe across processes) or Redis.

The supervisor (this process) starts the workers, restarts one that dies, and stops them all on SIGINT or
SIGTERM. Worker 0 alone runs the admin listener (`admin_port`): it reads the shared counters, so it shows
every worker's counts.

mitmproxy does not offer `SO_REUSEPORT` for its listeners; a worker sets it by giving
`asyncio.start_server`, which mitmproxy's listener calls, `reuse_port=True` (see `listen_with_reuse_port`).
"""

from __future__ import annotations

import asyncio
import ctypes
import functools
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import socket
import sys
import time
from collections.abc import Callable, Sequence
from multiprocessing.process import BaseProcess
from typing import Any

logger = logging.getLogger(__name__)

QUICK_EXIT_SECONDS = 10.0  # a worker that dies sooner than this after its start counts as failing
MOST_QUICK_EXITS = 3
STOP_SECONDS = 10.0  # then SIGKILL; less than the 15 s a service manager commonly waits
OPTIONS_ERROR = 2  # a worker's exit status for bad options: no use restarting it
PR_SET_PDEATHSIG = 1


def check_reuse_port(host: str, port: int) -> None:
    """`OSError` (with a sentence) when `host:port` cannot be shared with SO_REUSEPORT."""
    if not hasattr(socket, "SO_REUSEPORT"):
        raise OSError("this system has no SO_REUSEPORT: run one proxy per port instead of --workers")
    if port == 0:
        raise OSError("--workers needs a fixed --listen-port: every worker listens on the same one")


def listen_with_reuse_port() -> None:
    """Make this process's listening sockets share their port with the other workers (SO_REUSEPORT)."""
    original = asyncio.start_server
    if getattr(original, "reuse_port", False):
        return

    @functools.wraps(original)
    async def start_server(*args: Any, **kwargs: Any) -> asyncio.Server:
        kwargs.setdefault("reuse_port", True)
        return await original(*args, **kwargs)

    start_server.reuse_port = True  # type: ignore[attr-defined]
    asyncio.start_server = start_server  # type: ignore[assignment]


def supervise(
    count: int,
    work: Callable[[int], int],
    *,
    stop_signals: Sequence[signal.Signals] = (signal.SIGINT, signal.SIGTERM),
) -> int:
    """Run `work(index)` in `count` processes until a stop signal; restart a worker that exits.

    Returns 0 after a requested stop, or the failing status when a worker cannot start (bad options, a port
    in use): then restarting it would only fail again.
    """
    context = multiprocessing.get_context("spawn")
    stopping = False

    def request_stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    previous = {signum: signal.signal(signum, request_stop) for signum in stop_signals}
    workers: dict[int, tuple[BaseProcess, float]] = {}
    quick_exits = dict.fromkeys(range(count), 0)
    status = 0

    def start(index: int) -> None:
        process = context.Process(
            target=_run_worker, args=(work, index, os.getpid()), name=f"forward-proxy-worker-{index}"
        )
        process.start()
        workers[index] = (process, time.monotonic())

    try:
        for index in range(count):
            start(index)
        print(f"forward-proxy: {count} workers started (pids {_pids(workers)})", flush=True)
        while not stopping:
            sentinels = [process.sentinel for process, _ in workers.values()]
            multiprocessing.connection.wait(sentinels, timeout=0.2)
            for index, (process, started) in list(workers.items()):
                if process.is_alive() or stopping:
                    continue
                code = process.exitcode
                quick = time.monotonic() - started < QUICK_EXIT_SECONDS
                quick_exits[index] = quick_exits[index] + 1 if quick else 0
                if code == OPTIONS_ERROR or quick_exits[index] >= MOST_QUICK_EXITS:
                    print(
                        f"forward-proxy: worker {index} exited with {code} right after starting; stopping "
                        "all workers (see its message above)",
                        file=sys.stderr,
                        flush=True,
                    )
                    status = code or 1
                    stopping = True
                    break
                print(f"forward-proxy: worker {index} exited with {code}; starting it again", flush=True)
                start(index)
    finally:
        _stop_all([process for process, _ in workers.values()])
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return status


def _run_worker(work: Callable[[int], int], index: int, supervisor: int) -> None:
    _stop_with_supervisor(supervisor)
    listen_with_reuse_port()
    sys.exit(work(index))


def _stop_with_supervisor(supervisor: int) -> None:
    """Have the kernel send this worker SIGTERM when the supervisor dies, even by SIGKILL (Linux), so a
    killed supervisor leaves no orphan workers holding the port."""
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        except (OSError, AttributeError) as exc:
            logger.debug(f"no parent-death signal: {exc}")
    if os.getppid() != supervisor:  # it died before the prctl took effect
        sys.exit(0)


def _stop_all(processes: list[BaseProcess]) -> None:
    for process in processes:
        if process.is_alive() and process.pid is not None:
            process.terminate()  # SIGTERM to this worker's PID: it stops cleanly
    deadline = time.monotonic() + STOP_SECONDS
    for process in processes:
        process.join(max(0.0, deadline - time.monotonic()))
        if process.is_alive():
            process.kill()
            process.join(5)


def _pids(workers: dict[int, tuple[BaseProcess, float]]) -> str:
    return ", ".join(str(process.pid) for process, _ in workers.values())
