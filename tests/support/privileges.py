"""Run a child process as root without root's power to ignore file modes, so read-only tests mean it."""

from __future__ import annotations

import os
import shutil

import pytest


def without_root_privileges() -> tuple[str, ...]:
    """A wrapper (for `start_proxy(..., wrapper=...)`) that makes the process obey file modes: root
    overrides them unless it drops the capabilities to (CAP_DAC_OVERRIDE and friends); a normal user
    needs none. Skips the test when running as root without `setpriv` (util-linux)."""
    if os.geteuid() != 0:
        return ()
    if shutil.which("setpriv") is None:
        pytest.skip("root ignores read-only modes, and setpriv (util-linux) is missing to drop that power")
    return ("setpriv", "--bounding-set", "-dac_override,-dac_read_search,-fowner")
