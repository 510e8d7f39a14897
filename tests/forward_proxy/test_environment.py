"""The proxy host's environment holds mitmproxy and never torch (they run on different hosts)."""

import importlib.util


def test_proxy_environment_has_mitmproxy_and_no_torch() -> None:
    assert importlib.util.find_spec("mitmproxy") is not None
    assert importlib.util.find_spec("torch") is None
