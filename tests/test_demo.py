"""`make demo` (scripts/demo.sh) end to end: cold misses, warm hits, the statistics, and no server left over.

Each test runs the real script with its own folder and free loopback ports. The script prints the PID of
each server it starts and stops them by PID when it ends, also on Ctrl-C; the tests check both.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.support.processes import REPO, free_port

pytestmark = [pytest.mark.integration, pytest.mark.slow]

RUN_TIMEOUT = 600.0  # the install is done already; the demo itself takes two or three minutes here (the chat model loads)
STOP_TIMEOUT = 30.0  # from Ctrl-C to the script's exit, servers stopped
ANSI = re.compile(r"\x1b\[[0-9;]*m")
STARTED_PID = re.compile(r"^(?:model API|forward proxy) PID (\d+)$", re.MULTILINE)
STOPPING = re.compile(r"stopping what the demo started \(PIDs ([\d ]+)\)")


@dataclass
class Demo:
    """One run of scripts/demo.sh in its own session, its output collected line by line."""

    directory: Path
    ports: dict[str, int]
    process: subprocess.Popen[str] = field(init=False)
    lines: list[str] = field(default_factory=list)
    _reader: threading.Thread = field(init=False)

    def start(self) -> Demo:
        env = {key: value for key, value in os.environ.items() if key != "DEMO_HOLD"}
        env.update(
            DEMO_DIR=str(self.directory),
            DEMO_API_PORT=str(self.ports["api"]),
            DEMO_PROXY_PORT=str(self.ports["proxy"]),
            DEMO_ADMIN_PORT=str(self.ports["admin"]),
        )
        self.process = subprocess.Popen(
            ["bash", "scripts/demo.sh"],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,  # its own process group, as a terminal gives it
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        return self

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(ANSI.sub("", line))

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait_for_line(self, text: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(text in line for line in self.lines):
                return
            if self.process.poll() is not None:
                break
            time.sleep(0.2)
        pytest.fail(f"the demo never printed {text!r}:\n{self.output[-4000:]}")

    def wait(self, timeout: float) -> int:
        returncode = self.process.wait(timeout=timeout)
        self._reader.join(timeout=10)
        return returncode

    def started_pids(self) -> list[int]:
        return [int(pid) for pid in STARTED_PID.findall(self.output)]

    def stopped_pids(self) -> list[int]:
        stopping = STOPPING.search(self.output)
        assert stopping, f"the demo did not say what it stopped:\n{self.output[-4000:]}"
        return [int(pid) for pid in stopping.group(1).split()]

    def section(self, heading: str) -> str:
        """The output from the `== heading` line to the next `== ` line."""
        match = re.search(rf"^== {re.escape(heading)}.*?$(.*?)(?=^== |\Z)", self.output, re.S | re.M)
        assert match, f"no '== {heading}' section in:\n{self.output[-4000:]}"
        return match.group(1)

    def stop(self) -> None:
        """Teardown for a test that failed half-way: the script first, then any server it left."""
        if self.process.poll() is None:
            self.process.terminate()  # its trap stops the servers
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=STOP_TIMEOUT)
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)
        for pid in self.started_pids():
            if is_running(pid):
                os.kill(pid, signal.SIGKILL)


def is_running(pid: int) -> bool:
    """Whether `pid` is a live process (a zombie holds no port and runs nothing: it counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"


def is_listening(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
        return True
    return False


@pytest.fixture
def demo(tmp_path: Path) -> Iterator[Demo]:
    run = Demo(tmp_path / "demo", {name: free_port() for name in ("api", "proxy", "admin")})
    try:
        yield run.start()
    finally:
        run.stop()


def assert_everything_stopped(demo: Demo) -> None:
    started = demo.started_pids()
    assert len(started) == 2, f"the demo should print the PID of both servers:\n{demo.output[:4000]}"
    assert sorted(demo.stopped_pids()) == sorted(started)
    assert [pid for pid in started if is_running(pid)] == []
    assert [name for name, port in demo.ports.items() if is_listening(port)] == []


def test_the_demo_misses_cold_hits_warm_prints_statistics_and_stops_its_servers(demo: Demo) -> None:
    returncode = demo.wait(RUN_TIMEOUT)
    assert returncode == 0, demo.output[-4000:]

    cold = demo.section("cold")
    assert cold.count("X-Cache: MISS") == 2, cold  # embed and predict
    assert "X-Cache: documents [MISS 2]   query [MISS 1]" in cold  # search
    assert "HIT" not in cold

    warm = demo.section("warm")
    assert warm.count("X-Cache: HIT") == 2, warm
    assert "X-Cache: documents [HIT 2]   query [HIT 1]" in warm
    assert "MISS" not in warm

    chat_cold, chat_warm = demo.section("chat, cold"), demo.section("chat, warm")
    assert "X-Cache: MISS" in chat_cold, chat_cold
    assert "X-Cache: HIT" in chat_warm and "X-Cache-Saved-Tokens: " in chat_warm, chat_warm
    assert chat_answer(chat_warm) == chat_answer(chat_cold) != ""
    assert chat_chunks(chat_warm) == chat_chunks(chat_cold) > 1  # replayed as the stream it was

    load = demo.section("a bounded load")
    assert re.search(r"^latency ms by X-Cache: .*HIT p50 \d+\.\d p90 \d+\.\d", load, re.M), load
    warm_load = demo.section("the same requests again, warm")
    assert re.search(r"^X-Cache: HIT 300$", warm_load, re.M), warm_load  # the same seed: all repeats
    assert re.search(r"^latency ms by X-Cache: HIT p50 \d+\.\d p90 \d+\.\d$", warm_load, re.M), warm_load

    statistics = demo.section("cache statistics")
    assert re.search(r"^\s+hit ratio\s+\d+(\.\d+)?%$", statistics, re.M), statistics
    assert "HIT RATIO" in statistics  # the per-route table

    assert_everything_stopped(demo)


def chat_answer(section: str) -> str:
    """The streamed answer `client-app chat` printed: the lines between its command and its status line."""
    return section.split("\n", 2)[2].split("\nPOST ", 1)[0].strip()


def chat_chunks(section: str) -> int:
    found = re.search(r"\(streamed in (\d+) chunks\)", section)
    assert found, section
    return int(found.group(1))


@pytest.mark.parametrize("target", ["script", "process group"])
def test_ctrl_c_stops_the_demo_and_both_servers_promptly(demo: Demo, target: str) -> None:
    """`script`: only the script gets SIGINT, so its trap alone must stop the servers.
    `process group`: what Ctrl-C in a terminal does; every process of the demo gets SIGINT."""
    demo.wait_for_line("both are up", timeout=RUN_TIMEOUT)
    assert len(demo.started_pids()) == 2, demo.output
    interrupted = time.monotonic()
    if target == "script":
        os.kill(demo.process.pid, signal.SIGINT)
    else:
        os.killpg(demo.process.pid, signal.SIGINT)  # its own session: the group holds only the demo

    returncode = demo.wait(STOP_TIMEOUT)
    assert time.monotonic() - interrupted < STOP_TIMEOUT
    assert returncode == 130, demo.output[-4000:]
    assert "interrupted" in demo.output
    assert_everything_stopped(demo)
