"""The examples in the modules' docstrings run and hold."""

from __future__ import annotations

import doctest

import pytest

from forward_proxy.cache import decide, flights, generation, live, requestids, rows


@pytest.mark.parametrize("module", [rows, flights, decide, generation, live, requestids])
def test_docstring_examples(module: object) -> None:
    result = doctest.testmod(module)  # type: ignore[arg-type]
    assert result.attempted > 0 and result.failed == 0
