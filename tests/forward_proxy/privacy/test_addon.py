"""The privacy addon driven through mitmproxy's test context."""

from __future__ import annotations

import logging
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from mitmproxy import exceptions, http
from mitmproxy.test import taddons, tflow

from forward_proxy.privacy.addon import Privacy
from forward_proxy.privacy.masking import IDENTITY_HEADERS
from forward_proxy.privacy.pseudonym import Pseudonyms, load_or_create_key


def flow_from(address: str, *headers: tuple[str, str]) -> http.HTTPFlow:
    flow = tflow.tflow()
    flow.client_conn.peername = (address, 40000)
    flow.request.url = "http://127.0.0.1:8000/v1/embeddings"
    for name, value in headers:
        flow.request.headers.add(name, value)
    return flow


@pytest.fixture
def privacy() -> Iterator[Privacy]:
    addon = Privacy()
    yield addon
    addon.done()  # takes the log filters off the test's handlers


@pytest.fixture
def tctx(privacy: Privacy, tmp_path: Path) -> Iterator[taddons.context]:
    with taddons.context(privacy) as context:
        context.configure(privacy, confdir=str(tmp_path / "confdir"))
        yield context


def test_identity_headers_leave_and_the_pseudonym_arrives(tctx: taddons.context, privacy: Privacy) -> None:
    flow = flow_from(
        "127.0.0.2",
        *[(name, "10.9.8.7") for name in IDENTITY_HEADERS],
        ("Proxy-Authorization", "Basic YWxpY2U6c2VjcmV0"),
        ("X-Client-Pseudonym", "c-forged"),
        ("Accept", "application/json"),
    )
    privacy.requestheaders(flow)
    names = {name.lower() for name in flow.request.headers}
    assert not names & {name.lower() for name in IDENTITY_HEADERS}
    assert "proxy-authorization" not in names
    assert flow.request.headers.get_all("X-Client-Pseudonym") == [flow.metadata["fp.pseudonym"]]
    assert flow.metadata["fp.pseudonym"] != "c-forged"
    assert flow.request.headers["Accept"] == "application/json"
    assert "127.0.0.2" not in str(flow.request.headers) and "10.9.8.7" not in str(flow.request.headers)


def test_pseudonyms_are_stable_per_client_and_differ_between_clients(
    tctx: taddons.context, privacy: Privacy
) -> None:
    flows = [flow_from(address) for address in ("127.0.0.2", "127.0.0.2", "127.0.0.3")]
    for flow in flows:
        privacy.requestheaders(flow)
    ids = [flow.metadata["fp.pseudonym"] for flow in flows]
    assert ids[0] == ids[1] != ids[2]


def test_connect_flows_get_a_pseudonym_and_are_masked(tctx: taddons.context, privacy: Privacy) -> None:
    flow = flow_from("127.0.0.2", ("Proxy-Authorization", "Basic eA=="), ("X-Forwarded-For", "1.2.3.4"))
    flow.request.method = "CONNECT"
    privacy.http_connect(flow)
    assert flow.metadata["fp.pseudonym"].startswith("c-")
    assert "Proxy-Authorization" not in flow.request.headers and "X-Forwarded-For" not in flow.request.headers


def test_an_empty_header_name_sends_no_pseudonym_but_keeps_the_metadata(
    tctx: taddons.context, privacy: Privacy
) -> None:
    tctx.configure(privacy, pseudonym_header="")
    flow = flow_from("127.0.0.2", ("X-Client-Pseudonym", "c-forged"))
    privacy.requestheaders(flow)
    assert "X-Client-Pseudonym" in flow.request.headers  # no longer ours: an ordinary header
    assert flow.metadata["fp.pseudonym"].startswith("c-")


def test_custom_header_name_and_extra_masked_headers(tctx: taddons.context, privacy: Privacy) -> None:
    tctx.configure(privacy, pseudonym_header="X-Caller", mask_headers=["X-Device-Id"])
    flow = flow_from("127.0.0.2", ("X-Device-Id", "laptop-42"), ("X-Caller", "forged"))
    privacy.requestheaders(flow)
    assert "X-Device-Id" not in flow.request.headers
    assert flow.request.headers.get_all("X-Caller") == [flow.metadata["fp.pseudonym"]]


def test_truncate_mode_forwards_the_client_address_alone(tctx: taddons.context, privacy: Privacy) -> None:
    tctx.configure(privacy, forwarded_for="truncate")
    flow = flow_from("127.0.0.2", ("X-Forwarded-For", "6.6.6.6"), ("X-Real-IP", "6.6.6.6"))
    privacy.requestheaders(flow)
    assert flow.request.headers.get_all("X-Forwarded-For") == ["127.0.0.2"]
    assert "X-Real-IP" not in flow.request.headers


@pytest.mark.parametrize(
    ("option", "value", "match"),
    [
        ("forwarded_for", "on", "forwarded_for"),
        ("pseudonym_header", "X Client", "not a valid HTTP header name"),
        ("mask_headers", ["X-Ok", "bad:name"], "not a valid HTTP header name"),
        ("pseudonym_key", "short", "too short"),
    ],
)
def test_bad_options_are_refused(
    tctx: taddons.context, privacy: Privacy, option: str, value: Any, match: str
) -> None:
    with pytest.raises(exceptions.OptionsError, match=match):
        tctx.configure(privacy, **{option: value})


def test_key_file_defaults_to_mitmproxys_confdir_without_a_cache(
    tctx: taddons.context, privacy: Privacy, tmp_path: Path
) -> None:
    privacy.running()
    path = tmp_path / "confdir" / "forward-proxy-pseudonym.key"
    assert privacy.key_file() == path
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert privacy.pseudonym_of("127.0.0.2") == Pseudonyms(load_or_create_key(path)).of("127.0.0.2")


class FakeCache:
    """Declares the cache's `cache_dir` option, as the cache addon does."""

    def load(self, loader: Any) -> None:
        loader.add_option("cache_dir", str, "", "cache directory")


def test_key_file_lives_in_the_cache_dir_when_there_is_one(privacy: Privacy, tmp_path: Path) -> None:
    with taddons.context(privacy, FakeCache()) as tctx:
        tctx.options.update(cache_dir=str(tmp_path / "cache"))
        privacy.running()
        assert privacy.key_file() == tmp_path / "cache" / "pseudonym.key"
        assert (tmp_path / "cache" / "pseudonym.key").exists()


def test_explicit_key_and_key_file_and_rotation(
    tctx: taddons.context, privacy: Privacy, tmp_path: Path
) -> None:
    key_file = tmp_path / "keys" / "clients.key"
    tctx.configure(privacy, pseudonym_key_file=str(key_file))
    assert key_file.exists()  # an explicit file is loaded (or created) at configure time
    from_file = privacy.pseudonym_of("127.0.0.2")
    tctx.configure(privacy, pseudonym_key="0123456789abcdef0123456789abcdef")
    from_option = privacy.pseudonym_of("127.0.0.2")
    expected = Pseudonyms(bytes.fromhex("0123456789abcdef0123456789abcdef")).of("127.0.0.2")  # hex is decoded
    assert from_option == expected != from_file
    tctx.configure(privacy, pseudonym_key=None)
    assert privacy.pseudonym_of("127.0.0.2") == from_file
    key_file.unlink()  # rotation: a new key file, then the option is re-read (or the proxy restarted)
    tctx.configure(privacy, pseudonym_key_file=str(tmp_path / "keys" / "new.key"))
    assert privacy.pseudonym_of("127.0.0.2") != from_file


def test_log_records_about_clients_carry_the_pseudonym(
    tctx: taddons.context, privacy: Privacy, caplog: pytest.LogCaptureFixture
) -> None:
    privacy._install_scrubbers()  # load() ran before caplog's handler existed
    caplog.set_level(logging.INFO)
    logging.getLogger("mitmproxy.proxy.server").info("client connect", extra={"client": ("127.0.0.2", 40000)})
    tctx.configure(privacy, forwarded_for="transparent")
    logging.getLogger("mitmproxy.proxy.server").info("client connect", extra={"client": ("127.0.0.3", 40001)})
    first, second = caplog.records[-2:]
    assert first.getMessage() == f"[{privacy.pseudonym_of('127.0.0.2')}] client connect"
    assert first.client is None  # type: ignore[attr-defined]
    assert second.client == ("127.0.0.3", 40001)  # type: ignore[attr-defined]  # masking off: unchanged


def test_done_takes_the_filters_off(tctx: taddons.context, privacy: Privacy) -> None:
    privacy._install_scrubbers()
    handlers = [h for h in logging.getLogger().handlers if privacy._filter in h.filters]
    assert handlers
    privacy.done()
    assert not [h for h in logging.getLogger().handlers if privacy._filter in h.filters]
