"""The model host's environment holds torch and never mitmproxy (they run on different hosts)."""

import importlib.util


def test_model_environment_has_torch_and_no_mitmproxy() -> None:
    assert importlib.util.find_spec("torch") is not None
    assert importlib.util.find_spec("mitmproxy") is None
