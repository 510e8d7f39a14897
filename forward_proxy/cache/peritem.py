"""Per-item caching: a batch pays only for the rows it has not seen.

For a batched request (`rows.py` splits it), `RowCache.answer` does what the whole-request cache does for
a request, row by row:

1. every distinct row is looked up under its own key (the whole request's key, its body replaced by the
   row's key material): rows found fresh are taken from the store;
2. the rows still missing are claimed in the row flight (`rowflight.py`): rows another batch is computing
   right now are waited for, the others go upstream in ONE request, in the client's order, each distinct
   row once (rows another batch stored while this one looked are looked up once more instead). When
   nothing was found and nothing repeats, that request is the client's own, byte for byte.
   (OpenAI texts are the exception when the upstream does not send each input's token count in
   `X-Input-Tokens`: the proxy cannot count tokens, so it asks each such text in a request of its own,
   concurrently, to learn its count; a dynamically batching server still runs them in one forward pass.)
3. the answer is split into row answers, each stored under its own key, and the client gets the answer
   put together in its order, as the model would have given it (`X-Cache: HIT | MISS | PARTIAL`,
   `X-Cache-Rows: <rows from the cache>/<rows>`).

The request's `Cache-Control` applies to every row: `no-cache` looks up no row (REFRESH) but stores
them all, `max-age=N` takes only rows at most N seconds old, `only-if-cached` answers 504 unless every
row is cached (`no-store` never gets here: the whole request bypasses the cache). Rows belong to the
request's credential partition, namespace and model version like whole entries; an answer of another
version than the rows taken from the store makes the proxy ask the whole request again, so no answer
ever mixes two deployments. When the upstream fails and every missing row has an entry within the
stale-if-error window, those stand in (STALE).

Identical batches in flight at once share one answer (the addon's single flight: COALESCED). A batch
whose rows all came from other batches' calls is COALESCED too.

Whenever the proxy cannot put the answer together exactly — the upstream refuses the smaller request
(4xx: its error would name the wrong positions), answers in an unexpected shape, or row answers disagree
— it asks the client's whole request once more and passes that answer on unchanged (MISS).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from forward_proxy.cache.keys import KeyParts, cache_key, key_id
from forward_proxy.cache.policy import (
    RequestDirectives,
    Usability,
    age_header,
    response_lifetime,
    unstorable_reason,
    usability,
)
from forward_proxy.cache.rowflight import Claim, RowFlight
from forward_proxy.cache.rows import INPUT_TOKENS_HEADER, AnswerMismatch, Batch, FreshRows, RowAnswer
from forward_proxy.cache.singleflight import SingleFlight
from forward_proxy.cache.upstream import UpstreamClient, UpstreamError, UpstreamResponse
from forward_proxy.store.base import CacheStore, Entry, StoreError

logger = logging.getLogger(__name__)

ROWS_HEADER = "X-Cache-Rows"
METADATA_TIMEOUT = 5.0
_ROW_BODY_PREFIX = b"row\n"  # row keys never equal a whole request's key (whose body starts "json:")
# Headers that describe one answer on the wire or one computation, not a row or a merged answer.
_NOT_KEPT = frozenset(
    {
        b"age",
        b"x-cache",
        b"x-cache-key",
        b"x-cache-rows",
        b"content-length",
        INPUT_TOKENS_HEADER.lower().encode(),
    }
)
# Request headers the proxy sets itself for the upstream: it sends plain JSON and wants plain JSON back.
_NOT_SENT = frozenset({b"content-length", b"content-encoding", b"accept-encoding"})
_METADATA_NOT_SENT = _NOT_SENT | {b"content-type", b"accept"}
_TOKENS = INPUT_TOKENS_HEADER.lower().encode()


@dataclass(frozen=True)
class RowSettings:
    """The cache settings that rows follow (from `CacheConfig`)."""

    ttl: float
    stale_if_error: float
    statuses: frozenset[int]
    max_entry_size: int
    upstream_timeout: float
    version_header: str


@dataclass(frozen=True)
class BatchRequest:
    """One client request that splits into rows, and what the cache decided about it so far."""

    batch: Batch
    parts: KeyParts  # the whole request's key parts
    directives: RequestDirectives
    confirmed: bool  # the origin's version is known to be current (a hit may be served)
    origin: str
    route: str
    model: str | None
    server_name: str | None
    headers: Sequence[tuple[bytes, bytes]]  # the client's request headers
    raw_body: bytes  # the client's body, as sent (possibly compressed)


@dataclass
class RowsOutcome:
    """How a batched request was answered: the response and the figures the addon counts."""

    decision: str = "MISS"  # HIT | MISS | PARTIAL | REFRESH | COALESCED | STALE
    status: int = 0
    reason: bytes = b""
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)  # without X-Cache*, Age, Content-Length
    content: bytes = b""
    age: str | None = None  # the Age of the oldest row taken from the store (HIT, STALE)
    failure: UpstreamError | None = None  # no answer: the upstream failed and no stale rows cover it
    not_cached: bool = False  # only-if-cached, and some rows are not in the store
    rows: int = 0
    from_cache: int = 0  # rows served from the store
    upstream: int = 0  # rows this request sent upstream
    upstream_seconds: float = 0.0  # spent upstream by this request
    seconds_saved: float = 0.0  # what the rows served from the store originally took upstream
    bytes_from_cache: int = 0
    stores: int = 0
    evicted: int = 0
    store_errors: list[str] = field(default_factory=list)
    upstream_errors: int = 0
    version: str | None = None  # the version an upstream answer carried (to learn), else None
    unsplit: UpstreamResponse | None = None  # the answer to the whole request, passed on: store it whole


@dataclass(frozen=True)
class _Stored:
    answer: RowAnswer
    entry: Entry


@dataclass(frozen=True)
class Computed:
    """A row answer another batch computed, with the headers of the upstream answer it came in."""

    answer: RowAnswer
    headers: tuple[tuple[bytes, bytes], ...]


class RowCache:
    """Row lookups, row flights and model metadata for the cache addon (one per addon)."""

    def __init__(self, max_waiters: int = 1000) -> None:
        self.flight: RowFlight[str, Computed] = RowFlight(max_waiters)
        self._batching: dict[tuple[str, str, str | None], bool] = {}
        self._metadata_flights = SingleFlight[bool](max_waiters=1_000_000)
        # Per origin: whether its embedding answers carry X-Input-Tokens (absent: not seen an answer yet).
        self._reports_tokens: dict[str, bool] = {}

    # --- KServe metadata ---------------------------------------------------------------------------

    async def model_batches(
        self,
        client: UpstreamClient,
        parts: KeyParts,
        headers: Sequence[tuple[bytes, bytes]],
        server_name: str | None,
        upstream_timeout: float = METADATA_TIMEOUT,
    ) -> bool:
        """Whether the model of a KServe v2 infer request batches along its first dimension.

        Asks `GET /v2/models/{name}[/versions/{v}]` (with the request's credentials) once per origin, model
        and deployment version; a question left unanswered is asked again by the next request, and the
        request at hand is handled whole. The question waits at most `METADATA_TIMEOUT`, and never longer
        than the upstream timeout: a client of a hung upstream waits for it before its own call.
        """
        timeout = min(METADATA_TIMEOUT, upstream_timeout)
        metadata_path = parts.path.removesuffix("/infer")
        origin = f"{parts.scheme}://{parts.host}:{parts.port}"
        memo = (origin, metadata_path, parts.version)
        known = self._batching.get(memo)
        if known is not None:
            return known

        async def ask() -> bool:
            fields = [(name, value) for name, value in headers if name.lower() not in _METADATA_NOT_SENT]
            try:
                answer = await client.request(
                    parts.scheme,
                    parts.host,
                    parts.port,
                    "GET",
                    metadata_path,
                    [*fields, (b"accept", b"application/json")],
                    b"",
                    timeout,
                    server_name=server_name,
                )
            except UpstreamError as exc:
                logger.info(f"model metadata {origin}{metadata_path} unavailable: {exc.message}")
                return False
            if answer.status_code != 200:
                logger.info(f"model metadata {origin}{metadata_path} answered {answer.status_code}")
                return False
            try:
                size = json.loads(answer.content).get("max_batch_size", 0)
            except (ValueError, UnicodeDecodeError, AttributeError):
                size = 0
            batches = isinstance(size, int) and not isinstance(size, bool) and size > 0
            self._batching[memo] = batches
            return batches

        batches, _ = await self._metadata_flights.run(memo, ask, timeout=timeout * 2)
        return batches

    # --- answering ---------------------------------------------------------------------------------

    @staticmethod
    def row_key(parts: KeyParts, row_key: bytes, version: str | None, secret: bytes) -> str:
        """A row's cache key: the whole request's key with the row in place of the body."""
        return cache_key(dataclasses.replace(parts, body=_ROW_BODY_PREFIX + row_key, version=version), secret)

    async def answer(
        self,
        request: BatchRequest,
        *,
        store: CacheStore | None,
        client: UpstreamClient,
        secret: bytes,
        settings: RowSettings,
    ) -> RowsOutcome:
        """Answer a batched request from its rows: from the store, from other batches, and upstream."""
        work = _Work(self, request, store, client, secret, settings)
        return await work.run()


class _Work:
    """One batched request being answered (the state `RowCache.answer` passes between its steps)."""

    def __init__(
        self,
        rows: RowCache,
        request: BatchRequest,
        store: CacheStore | None,
        client: UpstreamClient,
        secret: bytes,
        settings: RowSettings,
    ) -> None:
        self.cache = rows
        self.request = request
        self.batch = request.batch
        self.store = store
        self.client = client
        self.secret = secret
        self.settings = settings
        parts = request.parts
        self.keys = [RowCache.row_key(parts, row.key, parts.version, secret) for row in self.batch.rows]
        self.outcome = RowsOutcome(rows=len(self.keys))
        self.found: dict[str, _Stored] = {}
        self.stale: dict[str, _Stored] = {}
        self.shared: dict[str, Computed] = {}

    async def run(self) -> RowsOutcome:
        request, outcome = self.request, self.outcome
        flight = self.cache.flight
        publications = flight.publications
        if not request.directives.no_cache:
            await self._lookup(self.keys)
        missing = list(dict.fromkeys(key for key in self.keys if key not in self.found))
        if not missing:
            return self._assemble("HIT", {})
        if request.directives.only_if_cached:
            outcome.not_cached = True
            outcome.from_cache = sum(1 for key in self.keys if key in self.found)
            return outcome
        claim = flight.claim(missing)
        try:
            if flight.publications != publications and claim.led and not request.directives.no_cache:
                await self._lookup_again(claim)
            self.shared = await flight.wait(claim, self.settings.upstream_timeout)
            to_compute = [key for key in missing if key not in self.shared and key not in self.found]
            if not to_compute:
                if all(key in self.found for key in self.keys):
                    return self._assemble("HIT", {})
                return self._assemble("PARTIAL" if self.found else "COALESCED", {})
            return await self._compute(to_compute, claim)
        finally:
            flight.abandon(claim)  # no-op once the answers were published

    async def _lookup_again(self, claim: Claim[str, Computed]) -> None:
        """Rows another batch stored while this one looked them up: from the store, also for followers."""
        await self._lookup(claim.led)
        found = {
            key: Computed(stored.answer, _fields(stored.entry.headers))
            for key in claim.led
            if (stored := self.found.get(key)) is not None
        }
        self.cache.flight.publish_some(claim, found)

    async def _lookup(self, keys: Sequence[str]) -> None:
        """The rows in the store: fresh ones (served now) and stale ones (only if the upstream fails)."""
        store, outcome = self.store, self.outcome
        if store is None:
            return  # unavailable: the addon counted that already
        distinct = list(dict.fromkeys(keys))
        try:
            entries = await asyncio.to_thread(lambda: [store.get(key) for key in distinct])
        except StoreError as exc:
            outcome.store_errors.append(str(exc))
            return
        now = time.time()
        request = self.request
        for key, entry in zip(distinct, entries, strict=True):
            answer = self.batch.load_answer(entry.content) if entry is not None else None
            if entry is None or answer is None:
                continue
            use = usability(
                entry,
                now=now,
                lifetime=response_lifetime(_header(entry.headers, "cache-control"), self.settings.ttl),
                max_age=request.directives.max_age,
                stale_if_error=self.settings.stale_if_error,
                current_version=request.parts.version,
            )
            if use is Usability.FRESH and (request.confirmed or request.directives.only_if_cached):
                self.found[key] = _Stored(answer, entry)
            elif use is not Usability.UNUSABLE:
                self.stale[key] = _Stored(answer, entry)

    async def _compute(self, to_compute: list[str], claim: Claim[str, Computed]) -> RowsOutcome:
        """Send the rows nobody has upstream (each distinct one once); store, share and merge the answers."""
        batch, request, outcome, settings = self.batch, self.request, self.outcome, self.settings
        wanted = set(to_compute)
        sent = batch.first_positions(position for position, key in enumerate(self.keys) if key in wanted)
        one_by_one = self._one_by_one(sent)
        whole = not one_by_one and sent == list(range(len(self.keys)))
        try:
            if one_by_one:
                requests = (self._send(batch.request_body([position]), raw=False) for position in sent)
                responses = list(await asyncio.gather(*requests))
            else:
                body = request.raw_body if whole else batch.request_body(sent)
                responses = [await self._send(body, raw=whole)]
        except UpstreamError as exc:
            outcome.upstream_errors += 1
            return self._failed(to_compute, exc)
        outcome.upstream += len(sent)
        outcome.upstream_seconds += max(response.seconds for response in responses)
        response = next((answer for answer in responses if answer.status_code != 200), responses[0])
        version = _version(response, settings.version_header, request.parts.version)
        outcome.version = version
        if response.status_code >= 500:
            outcome.upstream_errors += 1
            if all(key in self.stale for key in to_compute):
                return self._failed(to_compute, None)
        if response.status_code != 200:
            if whole or response.status_code >= 500:  # a server error names no input positions
                return self._passed_on(response, whole=whole)
            return await self._ask_whole(f"the upstream answered {response.status_code} to the missing rows")
        versions = {_version(answer, settings.version_header, request.parts.version) for answer in responses}
        if len(versions) > 1 or (version != request.parts.version and not whole):
            return await self._ask_whole("the model version changed")  # rows of two deployments never mix
        if batch.protocol == "openai-embeddings":
            self.cache._reports_tokens[request.origin] = response.header(_TOKENS) is not None
        try:
            if one_by_one:
                answers = [
                    batch.fresh_answers([position], answer.content, _text(answer.header(_TOKENS))).answers[0]
                    for position, answer in zip(sent, responses, strict=True)
                ]
                fresh = FreshRows(answers, 0)
            else:
                fresh = batch.fresh_answers(sent, response.content, _text(response.header(_TOKENS)))
        except AnswerMismatch as exc:
            if whole:
                logger.info(f"{request.route}: answer not split into rows ({exc}); cached whole")
                return self._passed_on(response)
            return await self._ask_whole(str(exc))

        headers = tuple(_kept(response.headers))
        computed: dict[str, Computed] = {}
        by_position: dict[int, Computed] = {}
        for position, answer in zip(sent, fresh.answers, strict=True):
            computed[self.keys[position]] = by_position[position] = Computed(answer, headers)
        size = sum(len(answer.content) for answer in responses) // len(sent)
        if self._storable(response, size):
            seconds = sum(answer.seconds for answer in responses) / len(sent)  # each row's share
            await self._store_rows(response, sent, fresh.answers, version, seconds)
        if version == request.parts.version:
            self.cache.flight.publish(
                claim, {key: row for key, row in computed.items() if row.answer.storable}
            )
        decision = "REFRESH" if request.directives.no_cache else "MISS"
        if whole:
            outcome.decision, outcome.status, outcome.reason = decision, response.status_code, response.reason
            outcome.headers = _kept(response.headers) + _tokens_header(fresh.answers, response)
            outcome.content = response.content
            return outcome
        return self._assemble(
            "PARTIAL" if self.found else decision, by_position, computed, fresh.unattributed_tokens
        )

    def _one_by_one(self, sent: list[int]) -> bool:
        """Whether to ask text rows one request each.

        An OpenAI answer reports one usage for the whole request, and the proxy cannot count tokens, so
        it learns each text's count from a request of that text alone, unless the upstream sends every
        input's count (X-Input-Tokens, as the model API does). Until an origin has answered once, it is
        assumed to send them.
        """
        if self.batch.protocol != "openai-embeddings" or self.cache._reports_tokens.get(
            self.request.origin, True
        ):
            return False
        return sum(1 for position in sent if self.batch.rows[position].tokens is None) > 1

    def _assemble(
        self,
        decision: str,
        by_position: dict[int, Computed],
        computed: dict[str, Computed] | None = None,
        unattributed_tokens: int = 0,
    ) -> RowsOutcome:
        """The answer to the whole batch from stored, shared and fresh rows, in the client's order."""
        outcome = self.outcome
        rows: list[RowAnswer] = []
        template: tuple[tuple[bytes, bytes], ...] | None = None
        for position, key in enumerate(self.keys):
            stored = self.found.get(key) or (self.stale.get(key) if decision == "STALE" else None)
            if stored is not None:
                rows.append(stored.answer)
                continue
            row = by_position.get(position) or self.shared.get(key) or (computed or {})[key]
            rows.append(row.answer)
            template = template or row.headers
        try:
            outcome.content = self.batch.merge(rows, unattributed_tokens)
        except ValueError as exc:
            # Rows stored from differently shaped answers, or usage that cannot be told apart.
            logger.warning(f"{self.request.route}: rows do not merge ({exc})")
            outcome.failure = UpstreamError("protocol", f"the rows of this batch do not merge: {exc}")
            return outcome
        used = [
            stored
            for key in self.keys
            if (stored := self.found.get(key) or (self.stale.get(key) if decision == "STALE" else None))
        ]
        if used:
            oldest = min((stored.entry for stored in used), key=lambda entry: entry.stored_at)
            outcome.age = age_header(oldest, time.time())
            if template is None:
                template = _fields(oldest.headers)
        outcome.decision = decision
        outcome.from_cache = len(used)
        outcome.seconds_saved = sum(stored.entry.upstream_seconds for stored in used)
        outcome.bytes_from_cache = sum(len(stored.answer.body()) for stored in used)
        outcome.status = 200
        outcome.headers = _kept(template or ()) + _tokens_header(rows, None)
        return outcome

    async def _send(self, body: bytes, *, raw: bool) -> UpstreamResponse:
        """One upstream call: the client's own body (`raw`), or a smaller one in plain JSON."""
        parts = self.request.parts
        fields = [
            (name, value)
            for name, value in self.request.headers
            if name.lower() not in _NOT_SENT or (raw and name.lower() == b"content-encoding")
        ]
        return await self.client.request(
            parts.scheme,
            parts.host,
            parts.port,
            parts.method,
            parts.path + (f"?{parts.query}" if parts.query else ""),
            fields,
            body,
            self.settings.upstream_timeout,
            server_name=self.request.server_name,
        )

    async def _ask_whole(self, why: str) -> RowsOutcome:
        """Send the client's own request and pass its answer on unchanged."""
        logger.info(f"{self.request.route}: answer not assembled from rows ({why}); asked whole")
        outcome = self.outcome
        try:
            response = await self._send(self.request.raw_body, raw=True)
        except UpstreamError as exc:
            outcome.upstream_errors += 1
            outcome.failure = exc
            return outcome
        outcome.upstream += len({row.key for row in self.batch.rows})
        outcome.upstream_seconds += response.seconds
        outcome.version = _version(response, self.settings.version_header, outcome.version)
        if response.status_code >= 500:
            outcome.upstream_errors += 1
        return self._passed_on(response)

    def _passed_on(self, response: UpstreamResponse, *, whole: bool = True) -> RowsOutcome:
        """An upstream answer passed on unchanged; the whole request's one is stored whole if it may be."""
        outcome = self.outcome
        outcome.unsplit = response if whole else None
        outcome.decision = "REFRESH" if self.request.directives.no_cache else "MISS"
        outcome.status, outcome.reason, outcome.content = (
            response.status_code,
            response.reason,
            response.content,
        )
        outcome.headers = _kept(response.headers) + _tokens_header([], response)
        return outcome

    def _failed(self, to_compute: list[str], failure: UpstreamError | None) -> RowsOutcome:
        """The upstream failed: stale rows stand in when they cover every row that was missing."""
        if all(key in self.stale for key in to_compute):
            return self._assemble("STALE", {})
        self.outcome.failure = failure or UpstreamError("protocol", "the upstream failed")
        return self.outcome

    def _storable(self, response: UpstreamResponse, row_size: int) -> bool:
        header = {name.decode("latin-1"): value.decode("latin-1") for name, value in response.headers}
        settings = self.settings
        reason = unstorable_reason(
            response.status_code, header, row_size, settings.statuses, settings.max_entry_size
        )
        if reason is not None:
            logger.debug(f"{self.request.route}: rows not stored ({reason})")
        return reason is None

    async def _store_rows(
        self,
        response: UpstreamResponse,
        sent: list[int],
        answers: list[RowAnswer],
        version: str | None,
        seconds: float,
    ) -> None:
        """Write every new row that can be stored under its own key (the version that computed it)."""
        store, request, outcome = self.store, self.request, self.outcome
        if store is None:
            return
        headers = tuple(
            (name.decode("latin-1"), value.decode("latin-1"))
            for name, value in response.headers
            if name.lower() not in _NOT_KEPT
        )
        header_size = sum(len(name) + len(value) + 4 for name, value in headers)
        now = time.time()
        writes: dict[str, Entry] = {}
        for position, answer in zip(sent, answers, strict=True):
            key = RowCache.row_key(request.parts, self.batch.rows[position].key, version, self.secret)
            if not answer.storable or key in writes:
                continue
            content = answer.body()
            writes[key] = Entry(
                status_code=200,
                headers=headers,
                content=content,
                stored_at=now,
                upstream_seconds=seconds,
                model_version=version,
                origin=request.origin,
                route=request.route,
                model=request.model,
                method=request.parts.method,
                path=request.parts.path,
                key_id=key_id(key),
                size=len(content) + header_size,
            )
        if not writes:
            return
        expire = (
            response_lifetime(_header(headers, "cache-control"), self.settings.ttl)
            + self.settings.stale_if_error
        )

        def write() -> int:
            return sum(store.set(key, entry, expire) for key, entry in writes.items())

        try:
            outcome.evicted += await asyncio.to_thread(write)
        except StoreError as exc:
            outcome.store_errors.append(str(exc))
            return
        outcome.stores += len(writes)


def _fields(headers: Sequence[tuple[str, str]]) -> tuple[tuple[bytes, bytes], ...]:
    """A stored entry's headers as header fields."""
    return tuple((name.encode("latin-1"), value.encode("latin-1")) for name, value in headers)


def _text(value: bytes | None) -> str | None:
    return value.decode("latin-1") if value is not None else None


def _version(response: UpstreamResponse, header: str, default: str | None) -> str | None:
    value = response.header(header.lower().encode())
    return value.decode("latin-1") if value is not None else default


def _header(headers: Sequence[tuple[str, str]], name: str) -> str | None:
    return next((value for key, value in headers if key == name), None)


def _kept(headers: Sequence[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    return [(name, value) for name, value in headers if name.lower() not in _NOT_KEPT]


def _tokens_header(
    answers: Sequence[RowAnswer], response: UpstreamResponse | None
) -> list[tuple[bytes, bytes]]:
    """X-Input-Tokens for the client's rows: the upstream's own, or the rows' counts when all are known."""
    name = INPUT_TOKENS_HEADER.lower().encode()
    if response is not None:
        value = response.header(name)
        return [(name, value)] if value is not None else []
    if not answers or any(answer.tokens is None for answer in answers) or "usage" not in answers[0].document:
        return []
    return [(name, ",".join(str(answer.tokens) for answer in answers).encode())]
