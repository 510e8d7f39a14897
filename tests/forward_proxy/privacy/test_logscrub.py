"""Client addresses never reach the proxy's output when masking is on."""

from __future__ import annotations

import io
import logging

from mitmproxy.log import MitmFormatter

from forward_proxy.privacy.logscrub import AddressScrubber, ScrubbingFilter, ScrubbingWriter
from forward_proxy.privacy.pseudonym import Pseudonyms

IDS = Pseudonyms(bytes(range(32)))
CLIENT = ("127.0.0.2", 40112)
P = IDS.of("127.0.0.2")


def record(
    message: str, *, client: tuple[object, ...] | None = None, name: str = "mitmproxy.proxy.server"
) -> logging.LogRecord:
    made = logging.LogRecord(name, logging.INFO, __file__, 1, message, (), None)
    if client is not None:
        made.client = client
    return made


def scrubbed(
    made: logging.LogRecord, *, enabled: bool = True, scrubber: AddressScrubber | None = None
) -> str:
    ScrubbingFilter(scrubber or AddressScrubber(IDS.of), enabled=lambda: enabled).filter(made)
    return MitmFormatter(colorize=False).format(made)


def test_the_client_field_becomes_the_pseudonym() -> None:
    line = scrubbed(record("client connect", client=CLIENT))
    assert line.endswith(f"[{P}] client connect")
    assert "127.0.0.2" not in line


def test_known_client_endpoints_in_messages_are_replaced_and_servers_kept() -> None:
    scrubber = AddressScrubber(IDS.of)
    scrubber.remember(CLIENT)
    line = scrubbed(
        record("Closing connection due to inactivity: Client(127.0.0.2:40112, state=open) to 127.0.0.1:8000"),
        scrubber=scrubber,
    )
    assert "127.0.0.2" not in line
    assert f"Client({P}, state=open)" in line
    assert "127.0.0.1:8000" in line  # the upstream stays readable


def test_a_record_teaches_the_scrubber_its_client() -> None:
    scrubber = AddressScrubber(IDS.of)
    scrubbed(record("client connect", client=CLIENT), scrubber=scrubber)
    assert scrubber.scrub("127.0.0.2:40112: GET http://127.0.0.1:8000/") == f"{P}: GET http://127.0.0.1:8000/"


def test_ipv6_and_mapped_and_tuple_forms() -> None:
    scrubber = AddressScrubber(IDS.of)
    scrubber.remember(("::1", 5555, 0, 0))
    scrubber.remember(("::ffff:10.0.0.7", 6000))
    assert scrubber.scrub("[::1]:5555 said hi") == f"{IDS.of('::1')} said hi"
    assert scrubber.scrub("from 10.0.0.7:6000") == f"from {IDS.of('10.0.0.7')}"
    assert "::1" not in scrubber.scrub("peername=('::1', 5555, 0, 0)")
    assert scrubber.scrub("[::1]:5556") == "[::1]:5556"  # another endpoint: not a known client


def test_tracebacks_are_scrubbed_too() -> None:
    scrubber = AddressScrubber(IDS.of)
    try:
        raise ConnectionError("peer 127.0.0.2:40112 reset the connection")
    except ConnectionError:
        import sys

        made = record("connection handler has crashed", client=CLIENT)
        made.exc_info = sys.exc_info()
    line = scrubbed(made, scrubber=scrubber)
    assert "ConnectionError" in line and "reset the connection" in line
    assert "127.0.0.2" not in line


def test_loggers_that_only_name_clients_lose_every_address() -> None:
    line = scrubbed(
        record("Client connection from 8.8.8.8 killed by block_global option.", name="mitmproxy.addons.block")
    )
    assert "8.8.8.8" not in line and IDS.of("8.8.8.8") in line


def test_nothing_changes_when_masking_is_off() -> None:
    line = scrubbed(record("client connect", client=CLIENT), enabled=False)
    assert "127.0.0.2:40112" in line


def test_a_record_is_rewritten_once_for_every_handler() -> None:
    made = record("client connect", client=CLIENT)
    scrubber = AddressScrubber(IDS.of)
    first = scrubbed(made, scrubber=scrubber)
    second = scrubbed(made, scrubber=scrubber)
    assert first.split("] ", 1)[1] == second.split("] ", 1)[1] == f"[{P}] client connect"


def test_the_scrubber_forgets_the_oldest_endpoints_beyond_its_capacity() -> None:
    scrubber = AddressScrubber(IDS.of, capacity=2)
    for port in (1, 2, 3):
        scrubber.remember(("127.0.0.2", port))
    assert scrubber.scrub("127.0.0.2:1") == "127.0.0.2:1"
    assert scrubber.scrub("127.0.0.2:3") == P


def test_the_writer_scrubs_what_passes_through() -> None:
    scrubber = AddressScrubber(IDS.of)
    scrubber.remember(CLIENT)
    out = io.StringIO()
    writer = ScrubbingWriter(out, scrubber, enabled=lambda: True)
    print("127.0.0.2:40112: GET http://127.0.0.1:8000/v1/embeddings", file=writer)  # type: ignore[arg-type]
    writer.flush()
    assert out.getvalue() == f"{P}: GET http://127.0.0.1:8000/v1/embeddings\n"
