"""Real model servers for the integration tests, started once per session on ephemeral loopback ports."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from tests.support.model_server import export_digits, start_model_api
from tests.support.processes import ManagedProcess

# Small limits, so that exceeding them costs the tests little.
LIMITS = {"max_inputs": 64, "max_text_chars": 2000, "max_body_bytes": 262_144}
LIMIT_ARGS = [
    "--max-inputs",
    str(LIMITS["max_inputs"]),
    "--max-text-chars",
    str(LIMITS["max_text_chars"]),
    "--max-body-bytes",
    str(LIMITS["max_body_bytes"]),
]


@dataclass
class Server:
    process: ManagedProcess
    url: str

    def log(self) -> str:
        return self.process.log()


def http() -> requests.Session:
    """A session that never goes through an HTTP proxy of the environment."""
    session = requests.Session()
    session.trust_env = False
    return session


@pytest.fixture(scope="session")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("model-api")


@pytest.fixture(scope="session")
def digits_program(work: Path) -> Path:
    return export_digits(work / "digits-seed0.pt2", seed=0)


@pytest.fixture(scope="session")
def server(work: Path, digits_program: Path) -> Iterator[Server]:
    """MiniLM and the digits classifier, batching on (a 20 ms window so concurrent tests batch)."""
    process, url = start_model_api(
        work,
        "--model",
        "all-MiniLM-L6-v2",
        "--model",
        f"digits={digits_program}",
        "--max-batch-delay-ms",
        "20",
        "--max-batch-size",
        "16",
        *LIMIT_ARGS,
    )
    try:
        yield Server(process, url)
    finally:
        process.stop()


@pytest.fixture(scope="session")
def client() -> Iterator[requests.Session]:
    session = http()
    try:
        yield session
    finally:
        session.close()
