"""X-Model-Version is a digest of the loaded weights: stable across restarts, new for new weights."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.model_api.conftest import http
from tests.support.model_server import export_digits, running_model_api


def version_of(work: Path, *models: Path) -> str:
    arguments = [argument for model in models for argument in ("--model", f"digits={model}")]
    with running_model_api(work, *arguments) as url:
        session = http()
        try:
            live = session.get(f"{url}/v2/health/live", timeout=30)
            metadata = session.get(f"{url}/v2/models/digits", timeout=30).json()
        finally:
            session.close()
    assert live.status_code == 200
    assert metadata["versions"]  # the model's own version: its weights digest
    return live.headers["X-Model-Version"]


@pytest.mark.slow
def test_same_weights_same_version_and_different_weights_a_new_one(work: Path, digits_program: Path) -> None:
    with ThreadPoolExecutor(max_workers=2) as pool:
        again = pool.submit(export_digits, work / "versions" / "digits-seed0-again.pt2", 0)
        other = pool.submit(export_digits, work / "versions" / "digits-seed1.pt2", 1)
        retrained, different = again.result(), other.result()
    first = version_of(work, digits_program)
    # A restart with the same weights, even exported again to another file, keeps the version.
    assert version_of(work, retrained) == first
    assert version_of(work, different) != first  # other weights, another version
