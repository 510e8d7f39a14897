"""Start the real model server (`model-api serve`) as a subprocess, from either test environment.

The proxy's tests run in `.venv`, which has neither torch nor the model server's packages; they start
the server from `.venv-model` through these helpers. Only the standard library and
`tests.support.processes` are imported here.

A session-scoped fixture in a conftest.py might read:

    @pytest.fixture(scope="session")
    def model_api_url(tmp_path_factory):
        work = tmp_path_factory.mktemp("model-api")
        digits = export_digits(work / "digits.pt2")
        with running_model_api(work, "--model", "all-MiniLM-L6-v2", "--model", f"digits={digits}") as url:
            yield url

The server's log (one JSON line per request) is `ManagedProcess.log()`, or the file in the work folder.
`GET {url}/stats` tells how many rows each model really computed.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

from tests.support.processes import REPO, ManagedProcess, console_script, free_port, wait_for_http

# Overrides where `model-api` is found (a path to the console script of an environment with torch).
BINARY_VARIABLE = "MODEL_API_BIN"
READY_TIMEOUT = 180.0  # loading MiniLM takes seconds, many more on a loaded 2-core machine


def model_api_command() -> str:
    """The `model-api` of the model environment (the one in `.venv` lacks torch)."""
    override = os.environ.get(BINARY_VARIABLE)
    if override:
        return override
    preferred = REPO / ".venv-model" / "bin" / "model-api"
    return str(preferred) if preferred.exists() else console_script("model-api")


def start_model_api(
    work_dir: Path,
    *extra_args: str,
    host: str = "127.0.0.1",
    port: int | None = None,
    env: dict[str, str] | None = None,
    timeout: float = READY_TIMEOUT,
    chat: bool = False,
) -> tuple[ManagedProcess, str]:
    """Start `model-api serve` on a free loopback port; return it and its base URL once ready.

    `extra_args` are `serve` options (`--model NAME=SOURCE`, `--no-batching`, ...). The caller stops the
    process (`process.stop()`), or uses `running_model_api` which does. The chat model (seconds to load)
    is left out (`--no-chat`) unless `chat` is true or `extra_args` say `--chat`.
    """
    port = port or free_port(host)
    base_url = f"http://{host}:{port}"
    chat_args = [] if chat or "--chat" in extra_args or "--no-chat" in extra_args else ["--no-chat"]
    argv = [model_api_command(), "serve", "--host", host, "--port", str(port), *chat_args, *extra_args]
    process = ManagedProcess(argv, work_dir / f"model-api-{port}.log", env).start()
    try:
        wait_for_http(f"{base_url}/v2/health/ready", timeout=timeout, proc=process.proc)
    except BaseException as error:
        process.stop()
        raise RuntimeError(
            f"model-api did not become ready: {error}\n--- its log ---\n{process.log()[-4000:]}"
        ) from error
    return process, base_url


@contextlib.contextmanager
def running_model_api(
    work_dir: Path,
    *extra_args: str,
    host: str = "127.0.0.1",
    env: dict[str, str] | None = None,
    timeout: float = READY_TIMEOUT,
    chat: bool = False,
) -> Iterator[str]:
    """The base URL of a model server that is stopped (by PID) when the block ends."""
    process, base_url = start_model_api(work_dir, *extra_args, host=host, env=env, timeout=timeout, chat=chat)
    try:
        yield base_url
    finally:
        process.stop()


def export_digits(path: Path, seed: int = 0, timeout: float = 300.0) -> Path:
    """Train and export the digits example to `path` (.pt2 or .pt) unless it is there already."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [model_api_command(), "export-example", str(path), "--seed", str(seed)],
            check=True,
            capture_output=True,
            timeout=timeout,
            cwd=REPO,
        )
    return path
