"""The cache addon: the one engine that answers the requests a cache rule matches.

mitmproxy carries every byte to and from the upstream; this addon only decides, in three hooks:

`request`   reads the request (`Asked`: canonical body, key parts, rows) and looks every row up in the
            store in one call (`decide.sort_entries`; a whole request is a batch of one row). All rows
            found: the answer is put together from the store (HIT). Rows missing that another request is
            asking for right now: wait for its answer (COALESCED). Otherwise this flow leads: when some
            rows were found or repeat, its body is rewritten to the missing rows (each once, in the
            client's order), else it keeps the client's bytes; then mitmproxy forwards it.
`response`  judges the leader's answer (`decide.unstorable`: may it be stored, and so shared), splits it
            into rows, puts the client's answer together (MISS, PARTIAL, REFRESH), hands the shareable
            rows to the waiters and stores them.
`error`     the upstream failed: stale rows stand in when every missing row has one (STALE), else the
            client gets the failure in the JSON error shape; waiters get the same.

`X-Cache` says what happened (`record.Decision`), `X-Cache-Key` the entry's opaque id, `X-Cache-Rows`
(batches) how many rows came from the store, `X-Cache-Usage` (embeddings put together from rows) whether
`usage` is exact. The decision travels as one `CacheRecord` in `flow.metadata[RECORD]`.

A failing store never fails a request: the flow is forwarded uncached, the failure logged and counted.
With Redis, one upstream exchange per request key is also coalesced across the fleet (a lease,
`store.locks.FleetFlight`): a request another proxy is asking waits for that proxy's stored answer.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import os
import re
import time
from dataclasses import dataclass
from typing import Any

from mitmproxy import connection, ctx, exceptions, http
from mitmproxy.net.http.status_codes import RESPONSES

from forward_proxy.cache.canonical import BodyTooLarge, canonical_body, canonical_query, json_body
from forward_proxy.cache.checks import CheckFailed, Service, TlsTrust, ask
from forward_proxy.cache.config import OPTIONS, CacheConfig
from forward_proxy.cache.decide import (
    ROW_TOKENS_HEADER,
    USAGE_HEADER,
    Lookup,
    Stored,
    entry_header,
    expire_seconds,
    joined_headers,
    sort_entries,
    unstorable,
)
from forward_proxy.cache.flights import Flight, InFlight, Outcome
from forward_proxy.cache.generation import (
    PACING_HEADER,
    REPLAY_HEADER,
    SAVED_TOKENS_HEADER,
    cacheable,
    complete_stream,
    completion_tokens,
    is_generation,
    paced_parts,
    pacing,
)
from forward_proxy.cache.keys import (
    KEY_HEADERS,
    NAMESPACE_HEADER,
    PARTITION_HEADERS,
    KeyParts,
    cache_key,
    key_headers,
    key_id,
    partition,
)
from forward_proxy.cache.live import LiveRelay, LiveStream
from forward_proxy.cache.policy import RequestDirectives, opaque_server_error, request_directives
from forward_proxy.cache.record import RECORD, CacheRecord, Decision, RowFigures
from forward_proxy.cache.requestids import ECHO_HEADER, HEADER_LENGTH, echoes, id_free, is_infer, with_id
from forward_proxy.cache.rows import (
    INPUT_TOKENS_HEADER,
    AnswerMismatch,
    Batch,
    RowAnswer,
    WholeRequest,
    protocol_of,
    split_embeddings,
    split_inference,
)
from forward_proxy.cache.rules import Rule, model_from_path
from forward_proxy.cache.streams import converted, other_shapes, usage_requested
from forward_proxy.cache.versions import Knowledge, VersionBook
from forward_proxy.errors import error_response
from forward_proxy.mitmseams import abort_upstream, answer_instead
from forward_proxy.stats.counters import Counters
from forward_proxy.store.aio import AsyncStore
from forward_proxy.store.backend import Backend, open_backend
from forward_proxy.store.base import Entry, StoreError
from forward_proxy.store.locks import FleetFlight, Held
from forward_proxy.store.memory import MemoryCounterStore

logger = logging.getLogger(__name__)

ROWS_HEADER = "X-Cache-Rows"
COUNTER_FLUSH_SECONDS = 0.25
STORE_FLUSH_SECONDS = 1.0
CHECK_TIMEOUT = 5.0
STORE_ERROR_LOG_SECONDS = 60.0
SECRET_RETRY_SECONDS = 2.0
_LEAD = "forward_proxy.cache.lead"
_FOLLOWING = "forward_proxy.cache.following"  # a waiter sent to the live relay: (its request, the stream)
_ROW_PREFIX = b"row\n"  # row keys never equal a whole request's key (whose body starts "json:" or "bytes:")
# Headers of an answer that describe one exchange on the wire, not the stored answer.
_NOT_STORED = frozenset(
    {
        "age",
        "x-cache",
        "x-cache-key",
        "x-cache-rows",
        "content-length",
        "transfer-encoding",
        "date",
        USAGE_HEADER,
        ROW_TOKENS_HEADER,
        ECHO_HEADER,
        PACING_HEADER,
    }
)
# ... and, for rows (stored decoded, one row each), what describes the whole batch's bytes.
_NOT_STORED_ROWS = _NOT_STORED | {"content-encoding", "transfer-encoding", INPUT_TOKENS_HEADER.lower()}


@dataclass
class Asked:
    """One request the cache handles: its rows, their keys and what the client asked of the cache."""

    flow: http.HTTPFlow
    rule: Rule
    record: CacheRecord
    directives: RequestDirectives
    service: str  # origin and Host: the deployment whose version the entries must match
    parts: KeyParts
    batch: Batch
    keys: list[str]  # one per row, in the client's order
    confirmed: bool  # the service's version is known to be current
    split: bool  # the batch is answered row by row (X-Cache-Rows)
    whole_key: str  # the whole request's key: where an answer that cannot be split is stored
    streamed: bool = False  # a completion asked as Server-Sent Events
    generation: bool = False  # a completion or chat completion
    id_free: tuple[bytes, str] | None = None  # KServe: the body keyed without its `id`, and the id
    swap_id: bool = False  # answered from an id-free entry: the asker's id is written in
    paced: bool = False  # a streamed hit is replayed at the pace the original arrived at
    generated_tokens: int | None = None  # converted from the other shape: the tokens its usage counted

    def as_whole(self) -> None:
        """From now on the request is one row: its upstream answers in a shape the cache cannot split."""
        self.batch, self.keys, self.split = WholeRequest(self.parts.body), [self.whole_key], False


@dataclass
class _Lead:
    """A request this flow leads: what it sent upstream, and for whom."""

    asked: Asked
    lookup: Lookup
    positions: list[int]  # the rows sent, by position in the client's batch
    rewritten: bool  # the body sent is not the client's
    flight: Flight
    started: float
    held: Held | None = None  # the fleet's lease for this request (Redis)
    deadline: asyncio.TimerHandle | None = None
    timed_out: bool = False
    recorded: bytearray | None = None  # a streamed answer, as it passed to the client
    arrivals: list[tuple[float, int]] | None = None  # when each part of it came: (seconds, bytes so far)
    live: LiveStream | None = None  # the same, for waiters following it (when it may be shared)


@dataclass(frozen=True)
class _Shared:
    """What a leader's answer gives its waiters besides the rows: how to frame them."""

    status: int
    reason: bytes
    headers: tuple[tuple[bytes, bytes], ...]  # the answer's headers as stored
    version: str | None
    row_seconds: float = 0.0  # the upstream time each row took


@dataclass(frozen=True)
class _Failure:
    status: int
    code: str
    message: str
    cause: str


LARGE_BODY = 256 * 1024  # bodies past this are parsed in a worker thread, not on the event loop


async def _off_the_loop_if_large(size: int, work: Any, *args: Any) -> Any:
    """`work(*args)`, in a worker thread when `size` bytes would hold the event loop up noticeably."""
    return await asyncio.to_thread(work, *args) if size > LARGE_BODY else work(*args)


def _is_event_stream(response: http.Response) -> bool:
    return response.headers.get("content-type", "").split(";", 1)[0].strip().lower() == "text/event-stream"


def _shared_of(entry: Entry) -> _Shared:
    """How to frame rows from the store: the status, reason phrase and headers of the stored answer."""
    return _Shared(
        entry.status_code,
        RESPONSES.get(entry.status_code, "").encode(),
        tuple((name.encode("latin-1"), value.encode("latin-1")) for name, value in entry.headers),
        entry.model_version,
        entry.upstream_seconds,
    )


def _service_name(request: http.Request) -> str:
    """The service a request is for: its origin and the `Host` it names (one address may serve many)."""
    return f"{request.scheme}://{request.host}:{request.port} {request.host_header or request.host}"


def _service_of(flow: http.HTTPFlow) -> Service:
    """Where the cache's own questions about a flow's service go: the address mitmproxy connected to
    (or, before it connected, the address the egress policy pinned the flow to), with the flow's `Host`
    and the name it asked for as the TLS server name."""
    request = flow.request
    host_header = request.headers.get("host") or request.host
    server_name = flow.server_conn.sni or host_header.rsplit(":", 1)[0].strip("[]")
    via = flow.server_conn.via
    if via is not None:  # upstream mode: asked through the upstream proxy, which resolves the name
        origin = (request.host, request.port)
        return Service(
            request.scheme, origin, host_header, server_name, via=via[1], via_tls=via[0] == "https"
        )
    peer = flow.server_conn.peername
    address = (peer[0], peer[1]) if peer is not None else (request.host, request.port)
    return Service(request.scheme, address, host_header, server_name)


def _batch_size(document: Any) -> int:
    """How many rows a batch claims to have, read without splitting it (OpenAI `input`, KServe's first
    dimension); 0 when it is no batch.

    >>> _batch_size({"input": ["a", "b"]}), _batch_size({"inputs": [{"shape": [3, 64]}]}), _batch_size([])
    (2, 3, 0)
    """
    if not isinstance(document, dict):
        return 0
    given = document.get("input")
    if isinstance(given, list):
        return len(given)
    inputs = document.get("inputs")
    if isinstance(inputs, list) and inputs and isinstance(inputs[0], dict):
        shape = inputs[0].get("shape")
        if isinstance(shape, list) and shape and isinstance(shape[0], int):
            return shape[0]
    return 0


def _plain_cause(message: str) -> str:
    """mitmproxy's words for a failed exchange, as a person reads them: `[Errno 111] Connect call
    failed (...)` is "Connection refused".

    >>> _plain_cause("[Errno 111] Connect call failed ('127.0.0.1', 1)"), _plain_cause("Server disconnected.")
    ('Connection refused', 'Server disconnected')
    """
    errno = re.match(r"\[Errno (\d+)\]", message)
    if errno is not None:
        return os.strerror(int(errno.group(1)))
    return message.strip().rstrip(".") or "the exchange failed"


class Cache:
    def __init__(self) -> None:
        self.config: CacheConfig | None = None
        self.store: AsyncStore | None = None
        self.backend: Backend | None = None
        self.fleet: FleetFlight[Any] | None = None
        self.counters = Counters(MemoryCounterStore())
        self.versions = VersionBook(interval=5.0)
        self.flights = InFlight(max_waiters=1000)
        self.relay = LiveRelay()  # where waiters follow a stream still arriving
        self.trust = TlsTrust()
        self.services: dict[str, Service] = {}  # where mitmproxy reached each service last
        self._checks: dict[str, asyncio.Task[bool]] = {}
        self._batching: dict[tuple[str, str, str | None], bool] = {}  # KServe: does the model batch
        # (service, route) whose upstream answered a batch whole, not in rows: its batches are not split
        self._answers_whole: set[tuple[str, str]] = set()
        self._secret = os.urandom(32)
        self._secret_shared = False  # False: this process's own secret, until the backend's can be read
        self._secret_tried_at = float("-inf")
        self._opened: tuple[Any, ...] | None = None
        self._background: set[asyncio.Task[Any]] = set()
        self._store_error_logged_at = float("-inf")
        self._version_check_warned: set[str] = set()

    # --- configuration -------------------------------------------------------------------------

    def load(self, loader: Any) -> None:
        for option in OPTIONS:
            loader.add_option(option.name, option.type, option.default, option.help)

    def configure(self, updated: set[str]) -> None:
        try:
            config = CacheConfig.from_options(ctx.options)
        except ValueError as exc:
            raise exceptions.OptionsError(str(exc)) from None
        self.config = config
        self.versions.interval = config.version_check_interval
        self.flights.max_waiters = config.max_waiters
        options = ctx.options
        self.trust = TlsTrust(
            insecure=bool(getattr(options, "ssl_insecure", False)),
            trusted_ca=getattr(options, "ssl_verify_upstream_trusted_ca", None) or "",
            trusted_ca_dir=getattr(options, "ssl_verify_upstream_trusted_confdir", None) or "",
            client_certs=getattr(options, "client_certs", None) or "",
        )
        if self._opened is not None:  # already running: follow a changed directory, size or secret
            self._open(config)

    def running(self) -> None:
        if self.config is not None:
            self._open(self.config)
        self._spawn(self._flush_store_forever())

    async def _flush_store_forever(self) -> None:
        """Every second, off the event loop: the store's buffered bookkeeping (LRU access times) and its
        eviction to the size limit (`DiskStore.flush`)."""
        while True:
            await asyncio.sleep(STORE_FLUSH_SECONDS)
            flush = getattr(self.store.store if self.store else None, "flush", None)
            if flush is None:
                continue
            try:
                evicted = await asyncio.to_thread(flush)
            except StoreError as exc:
                logger.debug(f"cache store flush failed: {exc}")
                continue
            if isinstance(evicted, int) and evicted:
                self.counters.count("evictions", origin="", route="", model=None, amount=evicted)

    async def settled(self) -> None:
        """Wait until no store write or version check started so far is in flight."""
        while pending := [task for task in self._background if not task.get_name().startswith("forever")]:
            await asyncio.gather(*pending, return_exceptions=True)

    def done(self) -> None:
        for task in self._background:
            task.cancel()
        self.relay.close()
        self.counters.close()
        if self.backend is not None:
            self.backend.close()

    def _spawn(self, work: Any, name: str = "forever") -> asyncio.Task[Any]:
        task = asyncio.ensure_future(work)
        task.set_name(name)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    def _open(self, config: CacheConfig) -> None:
        wanted = (
            config.directory,
            config.size_limit,
            config.partition_secret,
            config.backend,
            config.memory_tier,
            config.memory_ttl,
        )
        if wanted == self._opened:
            return
        self._opened = wanted
        self.counters.close()
        if self.backend is not None:
            self.backend.close()
        self.store = self.backend = self.fleet = None
        try:
            self.backend = open_backend(
                config.backend,
                config.directory,
                config.size_limit,
                memory_tier=config.memory_tier,
                memory_ttl=config.memory_ttl,
            )
        except StoreError as exc:
            logger.warning(  # not an error: the proxy serves on without the cache
                f"cache store unavailable, requests are forwarded uncached: {exc}. "
                "Check that the cache directory is writable, or choose another with --cache-dir."
            )
            self.counters = Counters(MemoryCounterStore())
        else:
            self.store = AsyncStore(self.backend.entries, kind=self.backend.kind)
            self.fleet = self.backend.flight
            self.counters = Counters(self.backend.counters, flush_interval=COUNTER_FLUSH_SECONDS)
        self._secret_shared = config.partition_secret is not None
        if config.partition_secret is not None:
            self._secret = config.partition_secret
        else:
            self._secret_tried_at = float("-inf")
            self._load_shared_secret(warn=True)

    def _load_shared_secret(self, *, warn: bool = False) -> None:
        """The key secret every process on the backend shares; until it can be read (Redis down at start),
        a secret of this process only, and another try at most every few seconds."""
        now = time.monotonic()
        if self.backend is None or now - self._secret_tried_at < SECRET_RETRY_SECONDS:
            return
        self._secret_tried_at = now
        try:
            self._secret = self.backend.partition_secret()
        except StoreError as exc:
            if warn:
                logger.warning(
                    f"using a secret for this process only ({exc}); other processes will not share keys "
                    "until the backend can be read"
                )
            return
        if not warn:
            logger.warning("read the shared key secret of the backend: entries are shared again")
        self._secret_shared = True

    # --- request -------------------------------------------------------------------------------

    async def request(self, flow: http.HTTPFlow) -> None:
        config = self.config
        if config is None or flow.response is not None or flow.error is not None:
            return
        request = flow.request
        path, _, query = request.path.partition("?")
        rule = config.rules.match(request.method, request.scheme, request.host, request.port, path)
        if rule is None:
            return
        origin = f"{request.scheme}://{request.host}:{request.port}"
        record = CacheRecord(rule.label, origin, model_from_path(path))
        flow.metadata[RECORD] = record
        headers = request.headers
        header = joined_headers(headers.fields)  # latin-1 text: no header byte can fail to encode again
        raw = request.raw_content
        generation = is_generation(path)
        if raw is None or (not generation and "text/event-stream" in header.get("accept", "")):
            self._decide(flow, Decision.BYPASS)  # a streamed exchange: mitmproxy forwards it as it is
            return
        try:
            body = await _off_the_loop_if_large(
                len(raw),
                canonical_body,
                raw,
                header.get("content-type"),
                header.get("content-encoding"),
                config.ignore_fields,
                config.request_body_decoded_max,
            )
        except BodyTooLarge as exc:  # forwarded untouched, never decoded further
            logger.info(f"not cached ({exc}; request_body_decoded_max, at most one coding)")
            self._decide(flow, Decision.BYPASS)
            return
        document = body.document
        model = document.get("model") if isinstance(document, dict) else None
        if isinstance(model, str):
            record.model = model
        directives = request_directives(header.get("cache-control"), header.get("pragma"))
        namespace = header.get(NAMESPACE_HEADER, "")
        paced = header.get(REPLAY_HEADER, "").strip().lower() == "paced"
        for control in (NAMESPACE_HEADER, REPLAY_HEADER):
            if control in headers:
                del headers[control]  # a proxy control header, not for the upstream
        streamed = isinstance(document, dict) and document.get("stream") is True
        if generation:
            cached = cacheable(document, asked_max_age=directives.max_age is not None)
        else:
            cached = not streamed
        if directives.no_store or not cached:
            self._decide(flow, Decision.BYPASS)  # sampled completions and other streams: as they are
            return
        if not self._secret_shared:
            self._load_shared_secret()

        service = _service_name(request)
        if service not in self.services:  # not reached yet: where mitmproxy is about to connect
            self.services[service] = _service_of(flow)
        confirmed = await self._version_confirmed(service, directives)
        parts = KeyParts(
            method=request.method,
            scheme=request.scheme,
            host=request.host,
            port=request.port,
            path=path,
            query=canonical_query(query),
            body=body.data,
            headers=key_headers(header.get, config.vary_headers),
            partition=partition(header.get, config.partition_headers, self._secret),
            namespace=namespace,
            version=self.versions.current(service),
        )
        if directives.only_if_cached and not parts.partition and not config.only_if_cached_shared:
            directives = dataclasses.replace(directives, only_if_cached=False)  # no oracle for others' texts
        whole_key = cache_key(parts, self._secret)
        batch = None
        if config.per_item_cache and not generation and (service, rule.label) not in self._answers_whole:
            batch = await self._rows_of(parts, document, service)
        if batch is None:
            batch, keys = WholeRequest(body.data), [whole_key]
        else:
            keys = [self._row_key(parts, row.key) for row in batch.rows]
        record.key_id = key_id(whole_key)
        free = id_free(body.data, header) if batch.protocol == "whole" and is_infer(path) else None
        asked = Asked(
            flow,
            rule,
            record,
            directives,
            service,
            parts,
            batch,
            keys,
            confirmed,
            batch.protocol != "whole",
            whole_key,
            streamed or "text/event-stream" in header.get("accept", ""),
            generation,
            free,
            paced=paced and generation,
        )

        lookup = Lookup(missing=list(dict.fromkeys(keys)))
        if not directives.no_cache:
            # One read: the rows, and for a batch the whole answer too (an upstream that does not
            # answer in rows is stored whole).
            free_key = self._id_free_key(asked, parts.version)
            read = [*keys, whole_key] if asked.split else keys
            shapes = self._other_shape_keys(asked, document)
            entries = await self._read(asked, [*read, *([free_key] if free_key else []), *shapes])
            whole = entries.get(whole_key) if asked.split else None
            if whole is not None and whole.model_version == parts.version:
                asked.as_whole()
                batch, keys = asked.batch, asked.keys
            sort = functools.partial(
                sort_entries,
                now=time.time(),
                directives=directives,
                ttl=config.ttl,
                stale_if_error=config.stale_if_error,
                version=parts.version,
                confirmed=confirmed,
            )
            if free_key is not None and self._echoed_usable(entries.get(free_key), batch, free_key, sort):
                asked.keys, asked.swap_id = [free_key], True  # another id's answer, this request's id
                keys = asked.keys
            lookup = sort(batch, keys, entries)
            newer = self.flights.answered(list(lookup.found))
            if newer:  # answered again since it was stored (a refresh being written): the newer answer
                for key in newer:
                    del lookup.found[key]
                asking = {*lookup.missing, *newer}
                lookup.missing = [key for key in dict.fromkeys(keys) if key in asking]
            if lookup.missing and shapes:  # the same answer, stored in the other shape
                lookup = self._converted(asked, document, shapes, entries, sort) or lookup
        if not lookup.missing:
            self._answer_from_store(asked, lookup)
            if asked.paced and asked.streamed:
                await self._replay_paced(asked, lookup)
            return
        if directives.only_if_cached:
            self._answer_not_cached(asked, lookup)
            return
        # Rows another request is asking for right now are waited for; a second round covers rows
        # whose leader went away (one of its waiters asks again, the others wait for that one).
        for _ in range(2):
            if directives.no_cache:
                break
            flights = self.flights.join([key for key in lookup.missing if key not in lookup.borrowed])
            if not flights and asked.split:
                flights = self.flights.join([asked.whole_key])  # an upstream that answers whole
            if not flights and asked.id_free is not None and not asked.swap_id:
                flights = self.flights.join([self._id_free_key(asked, asked.parts.version) or ""])
            if not flights:
                break
            if await self._wait_for(asked, lookup, flights):
                return
        await self._lead(asked, lookup)

    @staticmethod
    def _echoed_usable(entry: Entry | None, batch: Batch, key: str, sort: Any) -> bool:
        """Whether an id-free entry answers now: stored as echoing the id, and fresh."""
        return (
            entry is not None
            and bool(entry_header(entry, ECHO_HEADER))
            and not sort(batch, [key], {key: entry}).missing
        )

    def _other_shape_keys(self, asked: Asked, document: Any) -> list[str]:
        """A completion's keys in the other shape (streamed or whole): their stored answers may be
        converted into this request's (`streams`)."""
        if not asked.generation or not isinstance(document, dict) or self.config is None:
            return []
        ignored = self.config.ignore_fields
        return [
            cache_key(dataclasses.replace(asked.parts, body=json_body(shape, ignored)), self._secret)
            for shape in other_shapes(document)
        ]

    def _converted(
        self,
        asked: Asked,
        document: dict[str, Any],
        keys: list[str],
        entries: dict[str, Entry | None],
        sort: Any,
    ) -> Lookup | None:
        """A hit made from a fresh answer of the other shape (stored, or answered and being stored),
        converted into this request's shape; None when none converts faithfully (`streams.converted`)."""
        streamed = document.get("stream") is True
        for key in keys:
            published = self.flights.answer(key)
            entry = entries.get(key)
            if published is not None and isinstance(published.context, _Shared):
                shared = published.context
                entry = self._entry(asked, shared, published.rows[key], shared.row_seconds, shared.version)
            if entry is None:
                continue
            header = {name.lower(): value for name, value in entry.headers}
            if header.get("content-encoding", "identity").strip().lower() != "identity":
                continue
            content = converted(
                entry.content,
                header.get("content-type", ""),
                chat=asked.parts.path.endswith("/chat/completions"),
                streamed=streamed,
                include_usage=usage_requested(document),
            )
            if content is None:
                continue
            media = "text/event-stream; charset=utf-8" if streamed else "application/json"
            headers = tuple(
                (name, media if name.lower() == "content-type" else value)
                for name, value in entry.headers
                if name.lower() != PACING_HEADER  # the pace of the other shape's bytes
            )
            lookup: Lookup = sort(
                asked.batch,
                asked.keys,
                {asked.keys[0]: dataclasses.replace(entry, content=content, headers=headers)},
            )
            if not lookup.missing:
                asked.generated_tokens = completion_tokens(entry.content, streamed=not streamed)
                return lookup
        return None

    def _id_free_key(self, asked: Asked, version: str | None) -> str | None:
        """Where a KServe answer that only echoes the request's id is stored (`requestids`)."""
        if asked.id_free is None:
            return None
        return cache_key(
            dataclasses.replace(asked.parts, body=asked.id_free[0], version=version), self._secret
        )

    async def _rows_of(self, parts: KeyParts, document: Any, service: str) -> Batch | None:
        """The request's rows when it is a batch the cache answers row by row, else None."""
        assert self.config is not None
        protocol = protocol_of(parts.path)
        batch: Batch | None = None
        if _batch_size(document) > self.config.max_batch_rows:
            return None  # cached whole: the work one request makes the proxy do stays bounded
        if protocol == "openai-embeddings":
            batch = split_embeddings(document, self.config.ignore_fields)
        elif protocol == "kserve-v2-infer":
            batch = split_inference(document, self.config.ignore_fields)
            if batch is not None and not await self._model_batches(service, parts):
                batch = None
        return batch

    def _row_key(self, parts: KeyParts, row: bytes) -> str:
        return cache_key(dataclasses.replace(parts, body=_ROW_PREFIX + row), self._secret)

    async def _read(self, asked: Asked, keys: list[str]) -> dict[str, Entry | None]:
        if self.store is None:
            self._store_failed(asked, "the cache store could not be opened")
            return {}
        try:
            return await self.store.get_many(keys)
        except StoreError as exc:
            self._store_failed(asked, str(exc))
            return {}

    # --- waiting for a request in flight -------------------------------------------------------

    async def _wait_for(self, asked: Asked, lookup: Lookup, flights: list[Flight]) -> bool:
        """Answer from the flights computing the missing rows; False when this flow must ask itself."""
        assert self.config is not None
        # An answer complete before this request came (its rows being written to the store) is a HIT.
        answered_before = [flight.published for flight in flights]
        outcomes = await asyncio.gather(*(f.outcome(self.config.upstream_timeout) for f in flights))
        rows: dict[str, RowAnswer] = {}
        shared: _Shared | None = None
        failure: _Failure | None = None
        for outcome in outcomes:
            if outcome is None:
                continue
            if outcome.live is not None and not asked.split:  # still streaming: follow it live
                await self._follow(asked, outcome.live)
                return True
            rows.update(outcome.rows)
            shared = outcome.context or shared
            failure = outcome.failure or failure
        if asked.split and asked.whole_key in rows:  # the leader's upstream does not answer in rows
            asked.as_whole()
            lookup.found, lookup.stale, lookup.missing = {}, {}, [asked.whole_key]
        free_key = self._id_free_key(asked, asked.parts.version) if not asked.split else None
        if free_key is not None and asked.keys[0] not in rows and free_key in rows:  # another id's echo
            asked.keys, asked.swap_id = [free_key], True
            lookup.found, lookup.stale, lookup.missing = {}, {}, [free_key]
        lookup.borrowed.update((key, rows[key]) for key in lookup.missing if key in rows)
        for outcome, ready in zip(outcomes, answered_before, strict=True):
            if ready and outcome is not None:  # answered before this request came: as good as stored
                lookup.ready.update(key for key in lookup.missing if key in outcome.rows)
        if all(key in lookup.borrowed for key in lookup.missing) and shared is not None:
            answers = {key: stored.answer for key, stored in lookup.found.items()} | lookup.borrowed
            if all(key in lookup.ready for key in lookup.missing):
                self._answer_rows(
                    asked, Decision.HIT, shared, answers, from_cache=len(asked.keys), stored_at=time.time()
                )
                saved = sum(
                    lookup.found[key].entry.upstream_seconds if key in lookup.found else shared.row_seconds
                    for key in dict.fromkeys(asked.keys)
                )
                self._count_served(asked, saved)
            else:
                decision = Decision.PARTIAL if self._from_cache(asked, lookup) else Decision.COALESCED
                self._answer_rows(
                    asked, decision, shared, answers, from_cache=self._from_cache(asked, lookup)
                )
            self._count_rows(asked, lookup, upstream=0)
            return True
        if failure is not None:
            self._answer_failure(asked, lookup, failure, Decision.COALESCED)
            return True
        return False  # not shareable with this request, or no answer in time: ask on its own

    async def _replay_paced(self, asked: Asked, lookup: Lookup) -> None:
        """A streamed hit the client asked to have paced: its events are written, through the live relay,
        at the moments they came from the upstream (as recorded with the entry)."""
        stored = lookup.found[asked.keys[0]].entry
        response = asked.flow.response
        timing = entry_header(stored, PACING_HEADER)
        if response is None or timing is None or not _is_event_stream(response):
            return  # stored before pacing was recorded, or not a stream: sent at once
        content = response.raw_content or b""
        live = LiveStream(response.status_code, response.reason.encode("latin-1"), response.headers.fields)
        asked.flow.response = None

        async def play() -> None:
            started = time.monotonic()
            for at, part in paced_parts(content, timing):
                await asyncio.sleep(max(at - (time.monotonic() - started), 0.0))
                live.append(part)
            live.end(complete=True)

        self._spawn(play(), name="forever paced replay")  # not a store write: `settled` does not wait
        await self._follow(asked, live, decision=None)

    async def _follow(
        self, asked: Asked, live: LiveStream, decision: Decision | None = Decision.COALESCED
    ) -> None:
        """Send this waiter's flow to the live relay, which writes the leader's stream as it grows
        (mitmproxy passes it on event by event); `responseheaders` puts the client's request back."""
        host, port = await self.relay.address()
        flow = asked.flow
        flow.metadata[_FOLLOWING] = (flow.request, live)
        request = flow.request.copy()
        request.scheme, request.host, request.port, request.authority = "http", host, port, ""
        request.method, request.path, request.content = "GET", self.relay.share(live), b""
        for name in ("content-encoding", "transfer-encoding", "expect"):
            request.headers.pop(name, None)
        flow.request = request
        flow.server_conn = connection.Server(address=(host, port))  # no upstream proxy: it is in-process
        if decision is not None:
            self._decide(flow, decision)

    # --- leading: mitmproxy forwards the request -----------------------------------------------

    async def _lead(self, asked: Asked, lookup: Lookup) -> None:
        assert self.config is not None
        flow, batch = asked.flow, asked.batch
        asking = [key for key in lookup.missing if key not in lookup.borrowed]
        missing = set(asking)
        positions = batch.first_positions(
            position for position, key in enumerate(asked.keys) if key in missing
        )
        rewritten = asked.split and len(positions) != len(asked.keys)
        if rewritten:
            request = flow.request
            request.headers.pop("content-encoding", None)
            request.headers["accept-encoding"] = "identity"  # rows are split from plain JSON
            request.content = batch.request_body(positions)
        flight = self.flights.lead(asking)
        lead = _Lead(asked, lookup, positions, rewritten, flight, time.monotonic())
        if self.fleet is not None and self.store is not None:
            held, stored = await self.fleet.take(
                cache_key(asked.parts, self._secret),
                self._fleet_lookup(asked, lookup, time.time()),
                wait=self.config.upstream_timeout,
            )
            if stored is not None:  # another proxy asked and stored every missing row
                rows = {key: found.answer for key, found in stored.items()}
                self.flights.publish(
                    flight, Outcome(rows=rows, context=_shared_of(next(iter(stored.values())).entry))
                )
                self.flights.finish(flight)  # this proxy's waiters have their rows too
                if asked.whole_key in stored and asked.split:  # its upstream answers whole
                    asked.as_whole()
                    lookup.found = {}
                lookup.found.update(stored)
                lookup.missing = []
                self._answer_from_store(asked, lookup, Decision.COALESCED)
                return
            lead.held = held
        flow.metadata[_LEAD] = lead
        lead.deadline = asyncio.get_running_loop().call_later(
            self.config.upstream_timeout, self._give_up, lead
        )

    def _fleet_lookup(self, asked: Asked, lookup: Lookup, since: float) -> Any:
        """A blocking read (the fleet polls it in a thread): the missing rows once another proxy stored
        them all, or the whole answer when its upstream answers whole; else None."""
        store, batch, missing, whole_key = self.store, asked.batch, list(lookup.missing), asked.whole_key

        def stored_rows() -> dict[str, Stored] | None:
            assert store is not None
            found = {}
            for key in missing:
                entry = store.store.get(key)
                answer = batch.load_answer(entry.content) if entry is not None else None
                if entry is None or answer is None or entry.stored_at < since:
                    break
                found[key] = Stored(answer, entry)
            else:
                return found
            if whole_key in missing:
                return None
            entry = store.store.get(whole_key)
            if entry is None or entry.stored_at < since:
                return None
            return {whole_key: Stored(RowAnswer(None, 0, raw=entry.content), entry)}

        return stored_rows

    def _give_up(self, lead: _Lead) -> None:
        """`upstream_timeout` ran out before the upstream answered: end the exchange (the `error` hook
        answers the client)."""
        flow = lead.asked.flow
        if flow.error is None and flow.metadata.get(_LEAD) is lead:
            lead.timed_out = True
            if lead.recorded is None:  # waiters get the timeout now, not after mitmproxy saw the close
                self.flights.publish(lead.flight, Outcome(failure=self._failure(lead.asked, "", True)))
            if not abort_upstream(flow):
                self._settle(lead, Outcome())  # its waiters stop waiting for it at least

    # --- response ------------------------------------------------------------------------------

    async def response(self, flow: http.HTTPFlow) -> None:
        response = flow.response
        if response is None or self.config is None:
            return
        following = flow.metadata.pop(_FOLLOWING, None)
        if following is not None:  # a waiter that followed a live stream: it saved what the leader did
            flow.request, live = following
            followed: CacheRecord = flow.metadata[RECORD]
            shared = followed.decision is Decision.COALESCED and live.complete  # a paced hit counted already
            tokens = completion_tokens(bytes(live.body), streamed=True) if shared else None
            if tokens is not None:
                self._count_record(followed, "completion_tokens_saved", tokens)
            return
        named = response.headers.get(self.config.version_header)  # the version this answer names
        self._learn(flow, named)
        lead: _Lead | None = flow.metadata.pop(_LEAD, None)
        if lead is None:
            record: CacheRecord | None = flow.metadata.get(RECORD)
            if record is not None and record.decision is Decision.BYPASS and flow.server_conn.timestamp_start:
                seconds = max(
                    (response.timestamp_end or time.time()) - (flow.request.timestamp_end or 0), 0.0
                )
                record.upstream_seconds = seconds
                self._count_record(record, "upstream_seconds", seconds)
            return
        if lead.deadline is not None:
            lead.deadline.cancel()
        config, asked, lookup = self.config, lead.asked, lead.lookup
        seconds = time.monotonic() - lead.started
        asked.record.upstream_seconds = seconds
        self._count(asked, "upstream_seconds", seconds)
        status = response.status_code
        if status >= 500:
            self._count(asked, "upstream_errors")
        version = named if named is not None else asked.parts.version
        if version != asked.parts.version and not lookup.found:  # the key of the version that answers
            versioned = dataclasses.replace(asked.parts, version=version)
            asked.record.key_id = key_id(cache_key(versioned, self._secret))
        decision = Decision.REFRESH if asked.directives.no_cache else Decision.MISS
        if self._from_cache(asked, lookup):
            decision = Decision.PARTIAL

        if status >= 500 and self._stale_covers(lookup):
            self._settle(lead, Outcome())
            self._answer_stale(asked, lookup)
            return
        if status >= 500 and opaque_server_error(
            status, {"content-type": response.headers.get("content-type", "")}, response.raw_content or b""
        ):
            self._settle(lead, Outcome())
            self._answer_opaque(asked, status, response.headers.get("content-type"), decision)
            return

        content = bytes(lead.recorded) if lead.recorded is not None else response.raw_content or b""
        whole_stream = lead.recorded is not None and complete_stream(content)
        if lead.live is not None:
            lead.live.end(complete=whole_stream)
        reason = await _off_the_loop_if_large(
            len(content),
            functools.partial(
                unstorable,
                statuses=config.statuses,
                max_entry_size=config.max_entry_size,
                keyed_headers=self._keyed_headers(),
                whole_stream=whole_stream,
            ),
            status,
            response.headers.fields,
            content,
        )
        fresh: list[RowAnswer] | None = None
        if asked.split and 200 <= status < 300:
            try:
                decoded = response.get_content(strict=False) or b""
                fresh = asked.batch.fresh_answers(
                    lead.positions, decoded, response.headers.get(INPUT_TOKENS_HEADER)
                ).answers
            except (AnswerMismatch, ValueError) as exc:
                if lead.rewritten or reason is not None:
                    reason = reason or f"the answer cannot be split into rows ({exc})"
                else:  # the client's own request: its answer is kept whole, as for any request
                    self._answers_whole.add((asked.service, asked.rule.label))
                    asked.as_whole()
                    self.flights.alias(lead.flight, [asked.whole_key])  # the next request asks for it
                    lead.positions = [0]
        if not asked.split:
            fresh = [RowAnswer(None, 0, raw=content)]
        if lookup.found and version != asked.parts.version:
            # The upstream runs another version than the rows from the store: never mix deployments.
            self._settle(lead, Outcome())
            self._answer_version_changed(asked, decision)
            return
        if fresh is None:
            self._settle(lead, Outcome())
            if lead.rewritten and 200 <= status < 300:
                self._answer_unsplittable(asked, reason or "", decision)
            else:  # the upstream's own answer (an error names the rows it was sent): passed on as is
                self._finish_record(asked, decision, response, rows_upstream=len(lead.positions))
            return

        sent = [asked.keys[position] for position in lead.positions]
        answers = {key: stored.answer for key, stored in lookup.found.items()} | lookup.borrowed
        answers.update(zip(sent, fresh, strict=True))
        stored_headers = tuple(
            (name, value)
            for name, value in response.headers.fields
            if name.decode("latin-1").lower() not in (_NOT_STORED_ROWS if asked.split else _NOT_STORED)
        )
        shared = _Shared(
            status, response.reason.encode("latin-1"), stored_headers, version, seconds / max(len(fresh), 1)
        )
        if lead.recorded is not None:  # streamed to the client already, headers and all
            asked.record.streamed = True
            self._decide(asked.flow, decision)
        elif lead.rewritten or lookup.found or lookup.borrowed:
            self._answer_rows(asked, decision, shared, answers, from_cache=self._from_cache(asked, lookup))
        else:  # the client's own request and every row fresh: the upstream's answer as it came
            self._finish_record(asked, decision, response, rows_upstream=len(lead.positions))
        self._count_rows(asked, lookup, upstream=len(lead.positions))
        if lookup.found:  # the rows the store served saved their upstream time
            self._count(
                asked, "upstream_seconds_saved", sum(f.entry.upstream_seconds for f in lookup.found.values())
            )
            self._count(
                asked, "bytes_served_from_cache", sum(len(f.entry.content) for f in lookup.found.values())
            )

        if reason is not None:
            logger.debug(f"not stored ({reason}): {asked.rule.label} {asked.record.key_id}")
            self._settle(lead, Outcome())
            return
        rows = dict(zip(sent, fresh, strict=True))
        if version != asked.parts.version:  # stored under the version that computed them
            versioned = dataclasses.replace(asked.parts, version=version)
            sent = [
                self._row_key(versioned, asked.batch.rows[position].key)
                if asked.split
                else cache_key(versioned, self._secret)
                for position in lead.positions
            ]
            self.flights.alias(lead.flight, sent)  # the next request asks with the new version's keys
            rows.update(zip(sent, fresh, strict=True))
        entries = [
            (key, self._entry(asked, shared, answer, seconds / max(len(fresh), 1), version))
            for key, answer in zip(sent, fresh, strict=True)
        ]
        free_key = self._id_free_key(asked, version) if not asked.split else None
        if free_key is not None and asked.id_free and echoes(content, response.headers, asked.id_free[1]):
            # Kept for every id: it differs only in the id each asker sends (`requestids`).
            ((_, entry),) = entries
            entries = [(free_key, dataclasses.replace(entry, headers=(*entry.headers, (ECHO_HEADER, "1"))))]
            self.flights.alias(lead.flight, [free_key])  # another id asking before it is stored waits
            rows[free_key] = fresh[0]
        if lead.arrivals:  # a stream: when its parts came, for a paced replay
            timing = (PACING_HEADER, pacing(lead.arrivals))
            entries = [
                (key, dataclasses.replace(entry, headers=(*entry.headers, timing))) for key, entry in entries
            ]
        self.flights.publish(lead.flight, Outcome(rows=rows, context=shared), replace=lead.live is not None)
        self._spawn(self._store(lead, entries), name="store")

    async def _store(self, lead: _Lead, entries: list[tuple[str, Entry]]) -> None:
        assert self.config is not None
        asked, config, stored = lead.asked, self.config, False
        try:
            if self.store is not None:
                items = [
                    (key, entry, expire_seconds(entry, config.ttl, config.stale_if_error))
                    for key, entry in entries
                ]
                evicted = await self.store.set_many(items)
                stored = True
                self._count(asked, "stores", len(items))
                if evicted:
                    self.counters.count("evictions", origin="", route="", model=None, amount=evicted)
        except StoreError as exc:
            self._store_failed(asked, str(exc))
        finally:
            self.flights.finish(lead.flight)
            if lead.held is not None and self.fleet is not None:
                await self.fleet.release(lead.held, stored)

    def _keyed_headers(self) -> tuple[str, ...]:
        """The request headers in the key: an answer may `Vary` on them and still be stored."""
        assert self.config is not None
        config = self.config
        return (*KEY_HEADERS, *PARTITION_HEADERS, *config.partition_headers, *config.vary_headers)

    def _settle(self, lead: _Lead, outcome: Outcome) -> None:
        """The lead ends without storing: waiters get `outcome`, the fleet's lease goes."""
        if lead.live is not None:
            lead.live.end(complete=False)  # a no-op when the stream already ended whole
        self.flights.publish(lead.flight, outcome, replace=lead.live is not None)
        self.flights.finish(lead.flight)
        if lead.held is not None and self.fleet is not None:
            held, lead.held = lead.held, None
            self._spawn(self.fleet.release(held, False), name="release")

    def _entry(
        self, asked: Asked, shared: _Shared, answer: RowAnswer, seconds: float, version: str | None
    ) -> Entry:
        request = asked.flow.request
        headers = tuple((name.decode("latin-1"), value.decode("latin-1")) for name, value in shared.headers)
        if answer.estimated:
            headers += ((USAGE_HEADER, "estimated"),)
        if asked.batch.protocol == "openai-embeddings" and answer.tokens is not None:
            headers += ((ROW_TOKENS_HEADER, str(answer.tokens)),)
        content = answer.body()
        return Entry(
            status_code=shared.status,
            headers=headers,
            content=content,
            stored_at=time.time(),
            upstream_seconds=seconds,
            model_version=version,
            origin=asked.record.origin,
            route=asked.rule.label,
            model=asked.record.model,
            method=request.method,
            path=request.path,
            key_id=asked.record.key_id,
            size=len(content) + sum(len(name) + len(value) + 4 for name, value in headers),
        )

    # --- error ---------------------------------------------------------------------------------

    async def error(self, flow: http.HTTPFlow) -> None:
        lead: _Lead | None = flow.metadata.pop(_LEAD, None)
        record: CacheRecord | None = flow.metadata.get(RECORD)
        if lead is None:
            if record is not None and record.decision is Decision.BYPASS:
                self.counters.count(
                    "upstream_errors", origin=record.origin, route=record.route, model=record.model
                )
            return
        if lead.deadline is not None:
            lead.deadline.cancel()
        asked = lead.asked
        if lead.live is not None:
            lead.live.end(complete=False)  # its followers see it cut short, as this client does
        message = flow.error.msg if flow.error is not None else "the exchange failed"
        if "client disconnected" in message.lower():
            self._settle(lead, Outcome())  # the upstream is fine: waiters ask it themselves
            self._decide(flow, Decision.MISS)
            return
        self._count(asked, "upstream_errors")
        failure = self._failure(asked, message, lead.timed_out)
        self._settle(lead, Outcome(failure=failure))
        decision = (
            Decision.PARTIAL
            if lead.lookup.found
            else (Decision.REFRESH if asked.directives.no_cache else Decision.MISS)
        )
        if lead.recorded is not None:  # a stream cut short: the client has its part, nothing is stored
            asked.record.streamed = True
            self._decide(flow, decision)
            return
        self._answer_failure(asked, lead.lookup, failure, decision)
        if flow.response is not None:
            answer_instead(flow.response)  # mitmproxy writes the error page itself: this instead
            flow.response = None

    def _failure(self, asked: Asked, message: str, timed_out: bool) -> _Failure:
        assert self.config is not None
        if timed_out:
            cause = f"no answer within {self.config.upstream_timeout:g}s"
            status, code, advice = 504, "upstream_timeout", "Retry later, or raise upstream_timeout."
        else:
            cause = _plain_cause(message)
            if any(
                word in cause.lower() for word in ("refused", "resolve", "unreachable", "name or service")
            ):
                status, code = 502, "upstream_unreachable"
                advice = "Check that the upstream is running and reachable."
            else:
                status, code, advice = 502, "upstream_failed", "Check the upstream's logs; retry later."
        origin = asked.record.origin
        return _Failure(status, code, f"The upstream {origin} did not answer: {cause}. {advice}", cause)

    # --- answering -----------------------------------------------------------------------------

    def _answer_from_store(self, asked: Asked, lookup: Lookup, decision: Decision = Decision.HIT) -> None:
        shared = _shared_of(lookup.found[asked.keys[0]].entry)
        answers = {key: stored.answer for key, stored in lookup.found.items()}
        oldest = min(stored.entry.stored_at for stored in lookup.found.values())
        self._answer_rows(asked, decision, shared, answers, from_cache=len(asked.keys), stored_at=oldest)
        self._count_served(
            asked, sum(lookup.found[key].entry.upstream_seconds for key in dict.fromkeys(asked.keys))
        )
        self._count_rows(asked, lookup, upstream=0)
        if decision is Decision.HIT and self.versions.state(asked.service, time.time()) is Knowledge.DUE:
            self._check_version_soon(asked.service)

    def _count_served(self, asked: Asked, saved: float) -> None:
        """An answer served as a hit: the bytes it served and the upstream time it saved."""
        asked.record.upstream_seconds = saved
        served = asked.flow.response
        self._count(asked, "bytes_served_from_cache", len(served.raw_content or b"") if served else 0)
        self._count(asked, "upstream_seconds_saved", saved)

    def _answer_rows(
        self,
        asked: Asked,
        decision: Decision,
        shared: _Shared,
        answers: dict[str, RowAnswer],
        *,
        from_cache: int,
        stored_at: float | None = None,
    ) -> None:
        """Put the client's answer together from one answer per row, and send it."""
        try:
            content = asked.batch.merge([answers[key] for key in asked.keys])
        except ValueError as exc:
            self._answer_unsplittable(asked, str(exc), decision)
            return
        fields = [
            (name, value)
            for name, value in shared.headers
            if name.decode("latin-1").lower() not in _NOT_STORED
        ]
        if asked.swap_id and asked.id_free is not None:
            content, length = with_id(content, joined_headers(fields), asked.id_free[1])
            if length is not None:
                fields = [
                    (n, length.encode() if n.lower() == HEADER_LENGTH.encode() else v) for n, v in fields
                ]
        fields += [(b"x-cache", decision.value.encode()), (b"x-cache-key", asked.record.key_id.encode())]
        if stored_at is not None:
            fields.append((b"age", str(max(int(time.time() - stored_at), 0)).encode()))
        if asked.split:
            fields.append((ROWS_HEADER.lower().encode(), f"{from_cache}/{len(asked.keys)}".encode()))
        if asked.batch.protocol == "openai-embeddings":
            estimated = any(answers[key].estimated for key in asked.keys)
            asked.record.usage = "estimated" if estimated else "exact"
            fields.append((USAGE_HEADER.encode(), asked.record.usage.encode()))
            if not estimated:  # each input's own count, as a model API that reports them writes it
                counts = ",".join(str(answers[key].tokens or 0) for key in asked.keys)
                fields.append((INPUT_TOKENS_HEADER.lower().encode(), counts.encode()))
        if asked.generation and decision in (Decision.HIT, Decision.STALE, Decision.COALESCED):
            tokens = completion_tokens(content, asked.streamed)  # what the model did not generate again
            if tokens is None:  # a stream without usage made from a whole answer, which had it
                tokens = asked.generated_tokens
            if tokens is not None:
                fields.append((SAVED_TOKENS_HEADER.encode(), str(tokens).encode()))
                self._count(asked, "completion_tokens_saved", tokens)
        fields.append((b"content-length", str(len(content)).encode()))
        now = time.time()
        asked.flow.response = http.Response(
            http_version=b"HTTP/1.1",
            status_code=shared.status,
            reason=shared.reason,
            headers=http.Headers(fields),
            content=None,
            trailers=None,
            timestamp_start=now,
            timestamp_end=now,
        )
        asked.flow.response.raw_content = content
        if asked.split:
            asked.record.rows = RowFigures(len(asked.keys), from_cache, 0)
        self._decide(asked.flow, decision)

    def _finish_record(
        self, asked: Asked, decision: Decision, response: http.Response, *, rows_upstream: int
    ) -> None:
        """The upstream's own answer goes to the client: add the cache's headers."""
        response.headers["x-cache"] = decision.value
        response.headers["x-cache-key"] = asked.record.key_id
        if asked.split:
            response.headers[ROWS_HEADER] = f"0/{len(asked.keys)}"
            asked.record.rows = RowFigures(len(asked.keys), 0, rows_upstream)
        self._decide(asked.flow, decision)

    def _from_cache(self, asked: Asked, lookup: Lookup) -> int:
        return sum(1 for key in asked.keys if key in lookup.found or key in lookup.ready)

    def _count_rows(self, asked: Asked, lookup: Lookup, *, upstream: int) -> None:
        if not asked.split:
            return
        from_cache = self._from_cache(asked, lookup)
        if asked.record.rows is not None:
            asked.record.rows.upstream = upstream
        self._count(asked, "rows", len(asked.keys))
        self._count(asked, "rows_from_cache", from_cache)
        self._count(asked, "rows_upstream", upstream)

    def _stale_covers(self, lookup: Lookup) -> bool:
        return bool(lookup.missing) and all(key in lookup.stale for key in lookup.missing)

    def _answer_stale(self, asked: Asked, lookup: Lookup) -> None:
        logger.info(f"serving stale rows for {asked.record.origin}: the upstream failed")
        stale = Lookup(found={**lookup.found, **{key: lookup.stale[key] for key in lookup.missing}})
        self._answer_from_store(asked, stale, Decision.STALE)

    def _answer_failure(self, asked: Asked, lookup: Lookup, failure: _Failure, decision: Decision) -> None:
        if self._stale_covers(lookup):
            self._answer_stale(asked, lookup)
            return
        asked.flow.response = self._error(
            asked, decision, failure.status, failure.code, failure.message, cause=failure.cause
        )
        self._decide(asked.flow, decision)

    def _answer_not_cached(self, asked: Asked, lookup: Lookup) -> None:
        what = (
            f"{len(lookup.missing)} of the {len(dict.fromkeys(asked.keys))} rows of this batch are"
            if asked.split
            else "No cached answer for this request is"
        )
        asked.flow.response = self._error(
            asked,
            Decision.MISS,
            504,
            "not_cached",
            f"{what} not cached, and `Cache-Control: only-if-cached` forbids asking the upstream. Send the "
            "request without only-if-cached to have it computed.",
        )
        self._decide(asked.flow, Decision.MISS)

    def _answer_opaque(self, asked: Asked, status: int, media: str | None, decision: Decision) -> None:
        cause = f"it answered {status} with {media or 'no Content-Type'}, not a JSON error"
        message = (
            f"The upstream {asked.record.origin} failed: {cause}. Check the upstream's logs; retry later."
        )
        asked.flow.response = self._error(
            asked, decision, 502, "upstream_error", message, cause=cause, upstream_status=status
        )
        self._decide(asked.flow, decision)

    def _answer_unsplittable(self, asked: Asked, why: str, decision: Decision) -> None:
        message = (
            f"The upstream {asked.record.origin} answered the batch's missing rows in a shape the proxy "
            f"cannot put together with the cached rows: {why}. Retry with `Cache-Control: no-cache`, or "
            "turn per_item_cache off for this upstream."
        )
        asked.flow.response = self._error(asked, decision, 502, "upstream_answer_unsplittable", message)
        self._decide(asked.flow, decision)

    def _answer_version_changed(self, asked: Asked, decision: Decision) -> None:
        message = (
            f"The upstream {asked.record.origin} was redeployed while this batch was answered; rows of two "
            "versions are never mixed. Retry: the whole batch is then computed by the new version."
        )
        asked.flow.response = self._error(
            asked, decision, 503, "upstream_version_changed", message, extra_headers={"retry-after": "0"}
        )
        self._decide(asked.flow, decision)

    def _error(
        self,
        asked: Asked,
        decision: Decision,
        status: int,
        code: str,
        message: str,
        extra_headers: dict[str, str] | None = None,
        **extra: Any,
    ) -> http.Response:
        headers = {"x-cache": decision.value, "x-cache-key": asked.record.key_id, **(extra_headers or {})}
        return error_response(status, code, message, headers=headers, upstream=asked.record.origin, **extra)

    def _decide(self, flow: http.HTTPFlow, decision: Decision) -> None:
        record: CacheRecord = flow.metadata[RECORD]
        record.decision = decision
        self._count_record(record, "requests")
        self._count_record(record, decision.counter)

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        lead: _Lead | None = flow.metadata.get(_LEAD)
        response = flow.response
        following = flow.metadata.get(_FOLLOWING)
        if following is not None:
            flow.request = following[0]  # the client's own request again, for every later hook
        if lead is not None and response is not None:
            if _is_event_stream(response):
                self._pass_stream(lead, response)
            return
        if response is not None and not response.stream and _is_event_stream(response):
            response.stream = True  # Server-Sent Events pass event by event, never held back whole
        record: CacheRecord | None = flow.metadata.get(RECORD)
        if (
            response is not None
            and record is not None
            and record.decision is Decision.BYPASS
            and "x-cache" not in response.headers
        ):
            response.headers["x-cache"] = "BYPASS"  # an exchange mitmproxy forwards as it is

    def _pass_stream(self, lead: _Lead, response: http.Response) -> None:
        """A streamed answer passes to the client event by event as the model writes them, recorded on
        the way; when it may be shared, waiters follow it live (`live.LiveRelay`)."""
        assert self.config is not None
        asked = lead.asked
        decision = Decision.REFRESH if asked.directives.no_cache else Decision.MISS
        response.headers["x-cache"] = decision.value
        response.headers["x-cache-key"] = asked.record.key_id
        recorded = lead.recorded = bytearray()
        arrivals: list[tuple[float, int]] = []
        lead.arrivals, started = arrivals, time.monotonic()
        shareable = asked.generation and not unstorable(
            response.status_code,
            response.headers.fields,
            b"",
            statuses=self.config.statuses,
            max_entry_size=self.config.max_entry_size,
            keyed_headers=self._keyed_headers(),
            whole_stream=True,
        )
        live = None
        if shareable:
            fields = [
                (name, value)
                for name, value in response.headers.fields
                if name.decode("latin-1").lower() not in _NOT_STORED
            ]
            fields += [(b"x-cache", b"COALESCED"), (b"x-cache-key", asked.record.key_id.encode())]
            live = lead.live = LiveStream(response.status_code, response.reason.encode("latin-1"), fields)
            self.flights.publish(lead.flight, Outcome(live=live))

        def record_chunk(chunk: bytes) -> bytes:
            if chunk:
                recorded.extend(chunk)
                arrivals.append((time.monotonic() - started, len(recorded)))
            if live is not None:
                live.append(chunk)
            return chunk

        response.stream = record_chunk

    # --- versions and model metadata -----------------------------------------------------------

    def _learn(self, flow: http.HTTPFlow, version: str | None) -> None:
        """Every answer mitmproxy forwarded teaches the service's address and current version."""
        assert self.config is not None
        server = flow.server_conn
        if server.timestamp_start is None or (server.peername is None and server.via is None):
            return  # answered by an addon (a hit), not by the upstream
        service = _service_name(flow.request)
        self.services[service] = _service_of(flow)
        # Only an answer that names a version teaches one: a route of the service that sends none says
        # nothing about the deployment (the version check's answer does, with or without the header).
        if version is not None and self.versions.learn(service, version, time.time()):
            logger.info(f"{service} now runs version {version}")

    async def _version_confirmed(self, service: str, directives: RequestDirectives) -> bool:
        """Whether the service's known version may be trusted for a hit now (re-checked when expired)."""
        state = self.versions.state(service, time.time())
        if state is Knowledge.FRESH:
            return True
        if state is Knowledge.DUE:
            self._check_version_soon(service)
            return True
        if directives.only_if_cached:
            return False
        task = self._check_version_soon(service)
        try:
            return await asyncio.wait_for(asyncio.shield(task), CHECK_TIMEOUT * 2)
        except TimeoutError:
            return False

    def _check_version_soon(self, service: str) -> asyncio.Task[bool]:
        task = self._checks.get(service)
        if task is None:
            task = self._spawn(self._check_version(service), name="version check")
            self._checks[service] = task
            task.add_done_callback(lambda _: self._checks.pop(service, None))
        return task

    async def _check_version(self, service: str) -> bool:
        """Ask the service for its version now, with its Host; whether it answered."""
        config = self.config
        where = self.services.get(service)
        if config is None or where is None:
            return False
        timeout = min(config.upstream_timeout, CHECK_TIMEOUT)
        headers = [("Accept", "application/json"), ("User-Agent", "forward-proxy version check")]
        try:
            answer = await ask(where, config.version_check_path, headers, timeout, self.trust)
        except CheckFailed as exc:
            logger.info(f"version check of {service} failed: {exc}")
            return False
        version = answer.header(config.version_header)
        now = time.time()
        if version is not None or 200 <= answer.status < 300:
            if self.versions.learn(service, version, now) and version is not None:
                logger.info(f"{service} now runs version {version}")
        else:
            if service not in self._version_check_warned:
                self._version_check_warned.add(service)
                logger.warning(
                    f"version check GET {config.version_check_path} of {service} answered {answer.status} "
                    f"without {config.version_header}; set version_check_path to a cheap route of that "
                    "upstream that carries it"
                )
            self.versions.learn(service, self.versions.current(service), now)
        return True

    async def _model_batches(self, service: str, parts: KeyParts) -> bool:
        """Whether a KServe model batches along its first dimension (metadata `max_batch_size` > 0),
        asked once per service, model and version. Until mitmproxy has reached the service once there
        is no address to ask: its first request is handled whole."""
        memo = (service, parts.path.removesuffix("/infer"), parts.version)
        known = self._batching.get(memo)
        if known is not None:
            return known
        name = f"metadata {memo}"
        task = self._checks.get(name)
        if task is None:
            task = self._spawn(self._read_metadata(service, memo), name="metadata check")
            self._checks[name] = task
            task.add_done_callback(lambda _: self._checks.pop(name, None))
        try:
            return bool(await asyncio.wait_for(asyncio.shield(task), CHECK_TIMEOUT))
        except TimeoutError:
            return False

    async def _read_metadata(self, service: str, memo: tuple[str, str, str | None]) -> bool:
        import json

        where = self.services[service]
        assert self.config is not None
        timeout = min(CHECK_TIMEOUT, self.config.upstream_timeout)
        try:
            answer = await ask(where, memo[1], [("Accept", "application/json")], timeout, self.trust)
            size = json.loads(answer.body).get("max_batch_size", 0) if answer.status == 200 else 0
        except (CheckFailed, ValueError, AttributeError) as exc:
            logger.info(f"model metadata {service}{memo[1]} unavailable: {exc}")
            return False
        batches = isinstance(size, int) and not isinstance(size, bool) and size > 0
        self._batching[memo] = batches
        return batches

    # --- counting ------------------------------------------------------------------------------

    def _count(self, asked: Asked, name: str, amount: float = 1) -> None:
        self._count_record(asked.record, name, amount)

    def _count_record(self, record: CacheRecord, name: str, amount: float = 1) -> None:
        self.counters.count(name, origin=record.origin, route=record.route, model=record.model, amount=amount)

    def _store_failed(self, asked: Asked, why: str) -> None:
        self._count(asked, "store_errors")
        now = time.monotonic()
        if now - self._store_error_logged_at >= STORE_ERROR_LOG_SECONDS:
            self._store_error_logged_at = now
            logger.warning(f"cache store failed, forwarding uncached: {why} (logged at most once a minute)")
