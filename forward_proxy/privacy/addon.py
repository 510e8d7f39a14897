"""The privacy addon: masks client-identity headers, adds the client's pseudonym, scrubs the proxy's output.

Glue only: the header rules live in `masking.py`, the keyed ids and the key file in `pseudonym.py`, the
log rewriting in `logscrub.py`.

Sets `flow.metadata["fp.pseudonym"]` on every HTTP flow (CONNECT included) for the access log and
counters. With `forwarded_for=delete` (the default), nothing the proxy prints names a client address.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mitmproxy import connection, ctx, exceptions, http

from forward_proxy.privacy.logscrub import AddressScrubber, ScrubbingFilter, ScrubbingWriter
from forward_proxy.privacy.masking import MODES, Masking
from forward_proxy.privacy.pseudonym import (
    KEY_FILE_NAME,
    PseudonymKeyError,
    Pseudonyms,
    load_or_create_key,
    parse_key,
    world_readable,
)

log = logging.getLogger(__name__)

PSEUDONYM_METADATA = "fp.pseudonym"
_KEY_OPTIONS = frozenset({"pseudonym_key", "pseudonym_key_file", "cache_dir", "confdir"})
_HEADER_NAME = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")


class Privacy:
    def __init__(self) -> None:
        self.masking = Masking(pseudonym_header="X-Client-Pseudonym")
        self._pseudonyms: Pseudonyms | None = None
        self.scrubber = AddressScrubber(self.pseudonym_of)
        self._filter = ScrubbingFilter(self.scrubber, enabled=lambda: self.masking.hides_clients)
        self._filtered_handlers: list[logging.Handler] = []
        self._wrapped_dumper: Any = None

    def load(self, loader: Any) -> None:
        loader.add_option(
            "forwarded_for",
            str,
            "delete",
            """
            What upstreams learn about the client's address (Squid's names). "delete": every identity
            header (Forwarded, X-Forwarded-*, X-Real-IP, Via, ...) is removed and the proxy's logs show
            pseudonyms, never addresses; "truncate": those headers are removed and X-Forwarded-For is set
            to the client address alone; "transparent": the client's own identity headers pass unchanged.
            """,
            choices=MODES,
        )
        loader.add_option(
            "mask_headers",
            Sequence[str],
            [],
            """
            More request headers to remove in every forwarded_for mode, e.g. X-Device-Id
            (repeat the option for several).
            """,
        )
        loader.add_option(
            "pseudonym_header",
            str,
            "X-Client-Pseudonym",
            """
            The request header that carries the client's pseudonym (a keyed HMAC of its address) to
            upstreams; a copy sent by the client is always replaced. Empty sends no pseudonym.
            """,
        )
        loader.add_option(
            "pseudonym_key",
            str | None,
            None,
            """
            The pseudonym key itself (at least 16 bytes; hex is decoded). Overrides pseudonym_key_file.
            Prefer the file: options given on the command line are visible to other local users.
            """,
        )
        loader.add_option(
            "pseudonym_key_file",
            str | None,
            None,
            f"""
            The file holding the pseudonym key, created with mode 0600 if missing. Default: {KEY_FILE_NAME}
            in the cache directory (cache_dir), or forward-proxy-{KEY_FILE_NAME} in mitmproxy's confdir
            without the cache addon. A new key (delete the file and restart) changes every pseudonym.
            """,
        )
        self._install_scrubbers()

    def configure(self, updated: set[str]) -> None:
        if {"forwarded_for", "mask_headers", "pseudonym_header"} & updated:
            self.masking = self._masking_from_options()
        explicit = ctx.options.pseudonym_key is not None or ctx.options.pseudonym_key_file is not None
        if _KEY_OPTIONS & updated and (explicit or self._pseudonyms is not None):
            try:
                self._pseudonyms = self._load_pseudonyms()
            except PseudonymKeyError as exc:
                raise exceptions.OptionsError(str(exc)) from exc

    def running(self) -> None:
        self._install_scrubbers()
        try:
            self.pseudonyms()
        except PseudonymKeyError as exc:  # an error during startup makes mitmdump exit
            log.error(f"privacy: {exc}")

    def done(self) -> None:
        for handler in self._filtered_handlers:
            handler.removeFilter(self._filter)
        self._filtered_handlers.clear()
        if self._wrapped_dumper is not None:
            self._wrapped_dumper.outfp = self._wrapped_dumper.outfp.stream
            self._wrapped_dumper = None

    def client_connected(self, client: connection.Client) -> None:
        self._install_scrubbers()  # catches handlers installed after startup
        if self.masking.hides_clients and client.peername:
            self.scrubber.remember(client.peername)

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        self._mask(flow)

    def http_connect(self, flow: http.HTTPFlow) -> None:
        # The CONNECT request only leaves the proxy in upstream-proxy mode, but then it must be masked too.
        self._mask(flow)

    def _mask(self, flow: http.HTTPFlow) -> None:
        client = str(flow.client_conn.peername[0]) if flow.client_conn.peername else ""
        self.masking.apply(flow.request.headers, client=client)
        if not client:
            return
        pseudonym = self.pseudonym_of(client)
        flow.metadata[PSEUDONYM_METADATA] = pseudonym
        if self.masking.pseudonym_header:
            flow.request.headers[self.masking.pseudonym_header] = pseudonym

    def pseudonym_of(self, address: str) -> str:
        return self.pseudonyms().of(address)

    def pseudonyms(self) -> Pseudonyms:
        if self._pseudonyms is None:
            self._pseudonyms = self._load_pseudonyms()
        return self._pseudonyms

    def key_file(self) -> Path:
        """Where the key lives: the option, else beside the cache, else in mitmproxy's confdir."""
        if ctx.options.pseudonym_key_file:
            return Path(ctx.options.pseudonym_key_file).expanduser()
        if "cache_dir" in ctx.options:  # the cache addon is loaded: its directory is the proxy's state
            from forward_proxy.cache.config import default_cache_dir

            cache_dir = ctx.options.cache_dir
            return (Path(cache_dir).expanduser() if cache_dir else default_cache_dir()) / KEY_FILE_NAME
        return Path(ctx.options.confdir).expanduser() / f"forward-proxy-{KEY_FILE_NAME}"

    def _load_pseudonyms(self) -> Pseudonyms:
        if ctx.options.pseudonym_key is not None:
            return Pseudonyms(parse_key(ctx.options.pseudonym_key))
        path = self.key_file()
        key = load_or_create_key(path)
        if world_readable(path):
            log.warning(f"privacy: {path} is readable by other users; run `chmod 600 {path}`")
        return Pseudonyms(key)

    def _masking_from_options(self) -> Masking:
        names = [*ctx.options.mask_headers]
        if ctx.options.pseudonym_header:
            names.append(ctx.options.pseudonym_header)
        for name in names:
            if not _HEADER_NAME.match(name):
                raise exceptions.OptionsError(
                    f"{name!r} is not a valid HTTP header name (letters, digits and !#$%&'*+-.^_`|~ only)"
                )
        try:
            return Masking(
                mode=ctx.options.forwarded_for,
                extra=tuple(ctx.options.mask_headers),
                pseudonym_header=ctx.options.pseudonym_header,
            )
        except ValueError as exc:
            raise exceptions.OptionsError(str(exc)) from None

    def _install_scrubbers(self) -> None:
        """Put the scrubbing filter on every log handler and wrap mitmdump's flow printer (once each)."""
        for handler in logging.getLogger().handlers:
            if self._filter not in handler.filters:
                handler.addFilter(self._filter)
                self._filtered_handlers.append(handler)
        master = getattr(ctx, "master", None)
        dumper = master.addons.get("dumper") if master is not None else None
        if dumper is not None and not isinstance(dumper.outfp, ScrubbingWriter):
            dumper.outfp = ScrubbingWriter(dumper.outfp, self.scrubber, self._filter.enabled)
            self._wrapped_dumper = dumper
