"""The project's skeleton: every console script is reachable under a `.venv*/bin/` folder."""

import subprocess

import pytest

from tests.support.processes import console_script


@pytest.mark.parametrize("name", ["forward-proxy", "model-api", "client-app"])
def test_console_script_is_installed_and_answers_help(name: str) -> None:
    path = console_script(name)
    result = subprocess.run([path, "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "usage" in result.stdout.lower()
