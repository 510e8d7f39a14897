"""The decoding loop: one worker thread per chat model, several sequences decoded together.

Requests wait in a FIFO queue (bounded: `Overloaded` past `max_queued`). Whenever the worker comes
round, the waiting requests that fit under `max_batch` sequences start together as a *group*: one padded
prefill pass over their prompts. The new group then joins the one already decoding (their KV caches
left-padded to one length), so a newcomer starts within one decoding step instead of waiting for
earlier answers to finish, and every token costs one forward pass for all sequences; sequences leave
the batch (and its cache) as soon as they finish or their client goes away. Should the caches not be
mergeable, the groups take turns, one token each.

Thread-safety: `submit` and `Generation.events` run on the event loop; everything else runs on the
worker thread. They meet in a lock-protected queue (requests in) and in `loop.call_soon_threadsafe`
(events out). A `Generation`'s `cancelled` flag is a `threading.Event` the worker checks every step.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import torch

from model_api.generation.model import ChatModel
from model_api.generation.sampling import SamplingParams, next_token
from model_api.generation.text import TextStream

logger = logging.getLogger(__name__)


class Overloaded(Exception):
    """Too many requests are waiting for this model; the caller should retry later."""


class EngineClosed(Exception):
    """The engine stopped (the server is shutting down) before this request finished."""


class GenerationFailed(Exception):
    """The model failed while generating; the message says how."""


@dataclass(frozen=True)
class Delta:
    """New text of choice `index`."""

    index: int
    text: str


@dataclass(frozen=True)
class Finished:
    """Choice `index` is complete: `reason` is "stop" (end of answer or stop sequence) or "length"."""

    index: int
    reason: str
    tokens: int


@dataclass(frozen=True)
class _Failure:
    error: Exception


Event = Delta | Finished


class Generation:
    """One request's `n` choices as they are generated; iterate `events()` on the event loop."""

    def __init__(
        self, prompt_ids: list[int], params: SamplingParams, n: int, loop: asyncio.AbstractEventLoop
    ) -> None:
        self.prompt_ids = prompt_ids
        self.params = params
        self.n = n
        self.cancelled = threading.Event()
        self.completion_tokens = 0
        self._loop = loop
        self._queue: asyncio.Queue[Event | _Failure] = asyncio.Queue()

    def cancel(self) -> None:
        """Stop generating (the client went away); the worker drops the sequences at its next step."""
        self.cancelled.set()

    def _emit(self, event: Event | _Failure) -> None:
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, event)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            self.cancelled.set()

    async def events(self) -> AsyncIterator[Event]:
        """Deltas and one `Finished` per choice, in the order generated; raises if generation failed."""
        remaining = self.n
        while remaining:
            event = await self._queue.get()
            if isinstance(event, _Failure):
                raise event.error
            if isinstance(event, Finished):
                remaining -= 1
                self.completion_tokens += event.tokens
            yield event


@dataclass
class GenerationStats:
    """What the engine did since the server started, as `GET /stats` reports it (under a lock)."""

    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cancelled: int = 0  # requests whose client left before their answer was complete
    decode_steps: int = 0  # forward passes, prefills included
    largest_batch: int = 0  # most sequences in one forward pass
    merges: int = 0  # groups that joined the running one, so that all decode in one pass
    model_seconds: float = 0.0
    waiting: int = 0
    active_sequences: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def as_dict(self) -> dict[str, int | float]:
        with self.lock:
            return {
                "requests": self.requests,
                "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens,
                "cancelled": self.cancelled,
                "decode_steps": self.decode_steps,
                "largest_batch": self.largest_batch,
                "merges": self.merges,
                "model_seconds": round(self.model_seconds, 6),
                "tokens_per_second": round(self.completion_tokens / self.model_seconds, 3)
                if self.model_seconds
                else 0.0,
                "waiting": self.waiting,
                "active_sequences": self.active_sequences,
            }


@dataclass(eq=False)
class _Sequence:
    generation: Generation
    index: int
    generator: torch.Generator | None
    text: TextStream
    token_ids: list[int] = field(default_factory=list)


@dataclass(eq=False)
class _Group:
    """Sequences decoded together, with their shared cache and per-row masks and positions."""

    sequences: list[_Sequence]
    cache: Any
    attention_mask: torch.Tensor  # (rows, cached positions): 0 over each row's left padding
    positions: torch.Tensor  # (rows, 1): the position of each row's last token
    last_tokens: torch.Tensor  # (rows, 1): the token each row feeds next


class GenerationEngine:
    """Runs `model` on its own thread for every submitted request, `max_batch` sequences at a time."""

    def __init__(self, model: ChatModel, *, max_batch: int, max_queued: int) -> None:
        self.model = model
        self.max_batch = max_batch
        self.max_queued = max_queued
        self.stats = GenerationStats()
        self._waiting: collections.deque[Generation] = collections.deque()
        self._condition = threading.Condition()
        self._closed = False
        self._merging = True  # off for good if a cache cannot be merged (`_merged`)
        self._thread = threading.Thread(target=self._run, name=f"generate-{model.name}", daemon=True)
        self._thread.start()

    @property
    def name(self) -> str:
        return self.model.name

    def submit(self, prompt_ids: list[int], params: SamplingParams, n: int = 1) -> Generation:
        """Queue a request; raises `Overloaded` when `max_queued` are waiting, `EngineClosed` after close."""
        generation = Generation(prompt_ids, params, n, asyncio.get_running_loop())
        with self._condition:
            if self._closed:
                raise EngineClosed("the server is shutting down")
            for gone in [waiting for waiting in self._waiting if waiting.cancelled.is_set()]:
                self._waiting.remove(gone)  # a client that left holds no place in the queue
                self._count_cancelled(gone)
            if len(self._waiting) >= self.max_queued:
                raise Overloaded(f"{len(self._waiting)} requests are waiting, the most this server queues")
            self._waiting.append(generation)
            with self.stats.lock:
                self.stats.requests += 1
                self.stats.prompt_tokens += len(prompt_ids) * n
                self.stats.waiting = len(self._waiting)
            self._condition.notify()
        return generation

    async def close(self) -> None:
        with self._condition:
            self._closed = True
            self._condition.notify()
        await asyncio.to_thread(self._thread.join)

    # The worker thread.

    def _run(self) -> None:
        groups: list[_Group] = []
        while True:
            with self._condition:
                while not self._waiting and not groups and not self._closed:
                    self._condition.wait()
                if self._closed:
                    stranded = list(self._waiting) + [s.generation for g in groups for s in g.sequences]
                    self._waiting.clear()
                    for generation in dict.fromkeys(stranded):
                        generation._emit(_Failure(EngineClosed("the server is shutting down")))
                    return
                starting = self._admit(sum(len(group.sequences) for group in groups))
            if starting:
                self._guarded(self._start, starting, groups)
                # A group whose every sequence ended at its first token is done (its cache is stale).
                groups = self._merged([group for group in groups if group.sequences])
                self._publish_active(groups)
            for group in list(groups):
                self._guarded(self._step, group, groups)
            groups = [group for group in groups if group.sequences]
            self._publish_active(groups)

    def _merged(self, groups: list[_Group]) -> list[_Group]:
        """All groups as one, so that each token costs one forward pass for everybody.

        Their caches are left-padded to one length (the attention masks hide the padding) and stacked
        along the batch. This reaches into transformers' `DynamicLayer.keys` / `.values`, the one place
        that does: a cache of another kind, or a library that changed, leaves the groups taking turns
        (logged once; `merges` in /stats stays 0, which the tests check).
        """
        if len(groups) < 2 or not self._merging:
            return groups
        try:
            layer_lists = [group.cache.layers for group in groups]
            if any(type(layer).__name__ != "DynamicLayer" for layers in layer_lists for layer in layers):
                raise TypeError("the cache is not made of DynamicLayers")
            length = max(group.attention_mask.shape[1] for group in groups)

            def padded(tensor: torch.Tensor, dim: int) -> torch.Tensor:
                missing = length - tensor.shape[dim]
                if not missing:
                    return tensor
                shape = list(tensor.shape)
                shape[dim] = missing
                return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)

            # Everything computed before anything changes, so that a failure leaves the groups intact.
            keys = [
                torch.cat([padded(layers[i].keys, -2) for layers in layer_lists])
                for i in range(len(layer_lists[0]))
            ]
            values = [
                torch.cat([padded(layers[i].values, -2) for layers in layer_lists])
                for i in range(len(layer_lists[0]))
            ]
            masks = torch.cat([padded(group.attention_mask, -1) for group in groups])
        except (AttributeError, TypeError, RuntimeError) as error:
            self._merging = False
            logger.warning(
                "chat model %s: groups cannot be merged (%s); they take turns instead", self.name, error
            )
            return groups
        merged = groups[0]
        for layer, layer_keys, layer_values in zip(merged.cache.layers, keys, values, strict=True):
            layer.keys, layer.values = layer_keys, layer_values
        merged.attention_mask = masks
        merged.positions = torch.cat([group.positions for group in groups], dim=0)
        merged.last_tokens = torch.cat([group.last_tokens for group in groups], dim=0)
        merged.sequences = [sequence for group in groups for sequence in group.sequences]
        with self.stats.lock:
            self.stats.merges += len(groups) - 1
        return [merged]

    def _publish_active(self, groups: list[_Group]) -> None:
        with self.stats.lock:
            self.stats.active_sequences = sum(len(group.sequences) for group in groups)

    def _admit(self, active: int) -> list[Generation]:
        """The waiting requests that start now: in arrival order, while their choices fit the batch."""
        starting: list[Generation] = []
        while self._waiting:
            generation = self._waiting[0]
            if generation.cancelled.is_set():
                self._waiting.popleft()
                self._count_cancelled(generation)
                continue
            if active + generation.n > self.max_batch and (active or starting):
                break
            starting.append(self._waiting.popleft())
            active += generation.n
        with self.stats.lock:
            self.stats.waiting = len(self._waiting)
        return starting

    def _guarded(self, action: Any, subject: Any, groups: list[_Group]) -> None:
        """Run one prefill or step; a failure ends only the requests it concerned."""
        try:
            action(subject, groups)
        except Exception as error:
            logger.exception("generation failed in model %s", self.name)
            failed = subject if isinstance(subject, list) else [s.generation for s in subject.sequences]
            for generation in dict.fromkeys(failed):
                generation._emit(_Failure(GenerationFailed(f"{type(error).__name__}: {error}")))
            if isinstance(subject, _Group):
                subject.sequences = []

    def _forward(self, group_rows: int, *arguments: Any) -> torch.Tensor:
        started = time.perf_counter()
        logits = self.model.forward(*arguments)
        with self.stats.lock:
            self.stats.decode_steps += 1
            self.stats.largest_batch = max(self.stats.largest_batch, group_rows)
            self.stats.model_seconds += time.perf_counter() - started
        return logits

    def _start(self, generations: list[Generation], groups: list[_Group]) -> None:
        """Prefill the prompts of `generations` (left-padded to one length) as a new group."""
        from transformers import DynamicCache

        device = self.model.device
        sequences = [
            _Sequence(
                generation,
                index,
                generation.params.generator(index, device),
                TextStream(generation.params.stops),
            )
            for generation in generations
            for index in range(generation.n)
        ]
        longest = max(len(s.generation.prompt_ids) for s in sequences)
        input_ids = torch.full((len(sequences), longest), self.model.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(sequences), longest), dtype=torch.long)
        for row, sequence in enumerate(sequences):
            prompt = sequence.generation.prompt_ids
            input_ids[row, longest - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
            attention_mask[row, longest - len(prompt) :] = 1
        position_ids = (attention_mask.cumsum(dim=-1) - 1).clamp(min=0)
        cache = DynamicCache()
        logits = self._forward(len(sequences), input_ids, attention_mask, position_ids, cache)
        group = _Group(sequences, cache, attention_mask, position_ids[:, -1:], input_ids[:, -1:])
        groups.append(group)
        self._advance(group, logits)

    def _step(self, group: _Group, groups: list[_Group]) -> None:
        """One more token for every sequence of `group` whose client is still there."""
        keep = [row for row, s in enumerate(group.sequences) if not s.generation.cancelled.is_set()]
        if len(keep) < len(group.sequences):
            for generation in {s.generation for s in group.sequences if s.generation.cancelled.is_set()}:
                self._count_cancelled(generation)
            self._keep(group, keep)
        if not group.sequences:
            return
        group.attention_mask = torch.cat(
            [group.attention_mask, torch.ones((len(group.sequences), 1), dtype=torch.long)], dim=-1
        )
        group.positions = group.positions + 1
        logits = self._forward(
            len(group.sequences), group.last_tokens, group.attention_mask, group.positions, group.cache
        )
        self._advance(group, logits)

    def _advance(self, group: _Group, logits: torch.Tensor) -> None:
        """Choose each row's next token, send its new text, and drop the rows that are complete."""
        chosen: list[int] = []
        keep: list[int] = []
        for row, sequence in enumerate(group.sequences):
            params = sequence.generation.params
            token = next_token(logits[row], params, sequence.generator)
            sequence.token_ids.append(token)
            chosen.append(token)
            ended = token in self.model.eos_ids
            length = len(sequence.token_ids) >= params.max_tokens or (
                len(sequence.generation.prompt_ids) + len(sequence.token_ids) >= self.model.context_tokens
            )
            text = self.model.decode(sequence.token_ids)
            delta = sequence.text.advance(text, final=ended or length)
            if delta:
                sequence.generation._emit(Delta(sequence.index, delta))
            if ended or sequence.text.stopped or length:
                reason = "length" if length and not (ended or sequence.text.stopped) else "stop"
                sequence.generation._emit(Finished(sequence.index, reason, len(sequence.token_ids)))
                with self.stats.lock:
                    self.stats.completion_tokens += len(sequence.token_ids)
            else:
                keep.append(row)
        group.last_tokens = torch.tensor(chosen, dtype=torch.long).unsqueeze(-1)
        if len(keep) < len(group.sequences):
            self._keep(group, keep)

    def _keep(self, group: _Group, rows: list[int]) -> None:
        group.sequences = [group.sequences[row] for row in rows]
        if not rows:
            return
        index = torch.tensor(rows, dtype=torch.long)
        group.cache.batch_select_indices(index.to(self.model.device))
        group.attention_mask = group.attention_mask[index]
        group.positions = group.positions[index]
        group.last_tokens = group.last_tokens[index]

    def _count_cancelled(self, generation: Generation) -> None:
        with self.stats.lock:
            self.stats.cancelled += 1
        logger.info("generation in model %s stopped: its client went away", self.name)
