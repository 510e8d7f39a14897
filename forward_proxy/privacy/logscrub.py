"""Keep client addresses out of the proxy's own output: log records and mitmdump's flow lines.

mitmproxy writes client addresses in three places: the `client` field of its connection log records
(`[127.0.0.2:40112] client connect`), message texts (`Client(127.0.0.2:40112, state=open)`, HTTP/2
errors) and mitmdump's flow lines (`127.0.0.2:40112: GET http://...`). `AddressScrubber` replaces each
client endpoint it has seen with the client's pseudonym:

- a record's `client` field becomes a `[c-1234abcd...]` prefix of its message;
- `ip:port`, `[ip]:port` and `('ip', port` forms of known client endpoints in any text become the
  pseudonym (only client endpoints: the upstream at 127.0.0.1:8000 stays readable);
- records of loggers that only ever name clients (mitmproxy's `block` addon) lose every IP address.

No mitmproxy here: `ScrubbingFilter` is a `logging.Filter`, `ScrubbingWriter` wraps a text stream.
"""

from __future__ import annotations

import logging
import re
import threading
import traceback
from collections import OrderedDict
from collections.abc import Callable
from typing import IO, Any

from forward_proxy.policy.clients import client_address

# Loggers whose messages name only clients, so every address in them is a client's.
CLIENT_ONLY_LOGGERS = frozenset({"mitmproxy.addons.block"})

_ENDPOINT = re.compile(
    r"\[(?P<v6>[0-9A-Fa-f:.]+(?:%\w+)?)\]:(?P<v6port>\d+)"
    r"|(?<![\w.])(?P<v4>\d{1,3}(?:\.\d{1,3}){3}):(?P<v4port>\d+)"
    r"|\('(?P<tuplehost>[0-9A-Fa-f:.%\w]+)', (?P<tupleport>\d+)"
)
_ANY_ADDRESS = re.compile(r"(?<![\w.:])(?:\d{1,3}(?:\.\d{1,3}){3}|[0-9A-Fa-f]*:[0-9A-Fa-f:.]+)(?![\w.:])")

Endpoint = tuple[str, int]


class AddressScrubber:
    """Remembers client endpoints and rewrites texts that mention them. Thread-safe."""

    def __init__(self, pseudonym_of: Callable[[str], str], capacity: int = 65536) -> None:
        self._pseudonym_of = pseudonym_of
        self._capacity = capacity
        self._known: OrderedDict[Endpoint, str] = OrderedDict()
        self._lock = threading.Lock()

    def remember(self, peername: tuple[Any, ...]) -> str:
        """Note a client endpoint (a socket peername) and return its pseudonym."""
        endpoint = _endpoint(str(peername[0]), int(peername[1]))
        with self._lock:
            pseudonym = self._known.get(endpoint)
            if pseudonym is None:
                pseudonym = self._pseudonym_of(endpoint[0])
                self._known[endpoint] = pseudonym
                if len(self._known) > self._capacity:
                    self._known.popitem(last=False)
            else:
                self._known.move_to_end(endpoint)
            return pseudonym

    def scrub(self, text: str) -> str:
        """`text` with every known client endpoint replaced by its pseudonym."""
        if not self._known:
            return text
        return _ENDPOINT.sub(self._replace_endpoint, text)

    def scrub_all_addresses(self, text: str) -> str:
        """`text` with every IP address (known or not) replaced by its pseudonym."""
        return _ANY_ADDRESS.sub(self._replace_any, text)

    def _replace_endpoint(self, match: re.Match[str]) -> str:
        host = match["v6"] or match["v4"] or match["tuplehost"]
        port = match["v6port"] or match["v4port"] or match["tupleport"]
        try:
            endpoint = _endpoint(host, int(port))
        except ValueError:
            return match[0]
        with self._lock:
            pseudonym = self._known.get(endpoint)
        if pseudonym is None:
            return match[0]
        if match["tuplehost"]:  # keep the tuple's shape: ('c-...', 0
            return f"('{pseudonym}', 0"
        return pseudonym

    def _replace_any(self, match: re.Match[str]) -> str:
        try:
            return self._pseudonym_of(match[0])
        except ValueError:
            return match[0]


def _endpoint(host: str, port: int) -> Endpoint:
    return client_address(host).compressed, port


class ScrubbingFilter(logging.Filter):
    """A handler filter that rewrites each record in place before any handler formats it.

    Rewriting in place (rather than formatting a copy) means every handler that sees the record after
    this filter sees the scrubbed text, including handlers without the filter.
    """

    def __init__(self, scrubber: AddressScrubber, enabled: Callable[[], bool]) -> None:
        super().__init__()
        self.scrubber = scrubber
        self.enabled = enabled

    def filter(self, record: logging.LogRecord) -> bool:
        if not self.enabled() or getattr(record, "fp_scrubbed", False):
            return True
        message = record.getMessage()
        if record.exc_info:
            message += "\n" + "".join(traceback.format_exception(*record.exc_info)).rstrip()
            record.exc_info, record.exc_text = None, None
        client = getattr(record, "client", None)
        if isinstance(client, tuple) and len(client) >= 2:
            try:
                pseudonym = self.scrubber.remember(client)
            except ValueError:
                pseudonym = "client"
            message = f"[{pseudonym}] {message}"
            record.client = None
        if record.name in CLIENT_ONLY_LOGGERS:
            message = self.scrubber.scrub_all_addresses(message)
        record.msg, record.args = self.scrubber.scrub(message), ()
        record.fp_scrubbed = True
        return True


class ScrubbingWriter:
    """A text stream that scrubs what is written to it, e.g. mitmdump's flow output."""

    def __init__(self, stream: IO[str], scrubber: AddressScrubber, enabled: Callable[[], bool]) -> None:
        self.stream = stream
        self.scrubber = scrubber
        self.enabled = enabled

    def write(self, text: str) -> int:
        return self.stream.write(self.scrubber.scrub(text) if self.enabled() else text)

    def __getattr__(self, name: str) -> Any:  # flush, isatty, fileno, encoding ...
        return getattr(self.stream, name)
