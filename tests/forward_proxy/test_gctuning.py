"""`forward_proxy.gctuning`: the garbage collector of a long-lived proxy (its effect on the latency tail
is measured by bench/bench_clients.py, not here)."""

from __future__ import annotations

import gc
import subprocess
from collections.abc import Iterator

import pytest
from mitmproxy.test import taddons

from forward_proxy.gctuning import THRESHOLDS, GcTuning
from tests.support.processes import console_script


@pytest.fixture(autouse=True)
def python_defaults() -> Iterator[None]:
    """Whatever a test does to the collector is undone for the tests after it."""
    thresholds = gc.get_threshold()
    gc.unfreeze()
    yield
    gc.unfreeze()
    gc.set_threshold(*thresholds)


def test_running_freezes_start_up_and_raises_the_old_threshold() -> None:
    addon = GcTuning()
    with taddons.context(addon):
        addon.running()
        assert gc.get_freeze_count() > 0
        assert gc.get_threshold() == THRESHOLDS


def test_off_keeps_pythons_collector() -> None:
    addon = GcTuning()
    before = gc.get_threshold()
    with taddons.context(addon) as context:
        context.configure(addon, gc_tuning=False)
        addon.running()
        assert gc.get_freeze_count() == 0
        assert gc.get_threshold() == before


def test_forward_proxy_run_has_the_option() -> None:
    listed = subprocess.run(
        [console_script("forward-proxy"), "run", "--options"], capture_output=True, text=True, timeout=60
    )
    assert listed.returncode == 0, listed.stderr
    assert "gc_tuning: true" in listed.stdout
