"""How the next token of a sequence is chosen: greedy at temperature 0, else nucleus sampling.

Each sequence that samples owns a `torch.Generator` seeded from the request's `seed` (and the choice's
index), so a seeded request draws the same tokens whatever else is decoded beside it.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    """What a request asks of the decoding, already checked against the server's limits."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stops: tuple[str, ...] = ()

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def generator(self, choice: int, device: torch.device) -> torch.Generator | None:
        """The random source of choice number `choice`; None when decoding is greedy."""
        if self.greedy:
            return None
        seed = self.seed if self.seed is not None else secrets.randbits(63)
        generator = torch.Generator(device=device)
        generator.manual_seed((seed + choice) % (1 << 63))
        return generator


def next_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """The next token id from one sequence's logits (a 1-D tensor over the vocabulary)."""
    if params.greedy or generator is None:
        return int(torch.argmax(logits).item())
    probabilities = torch.softmax(logits.float() / params.temperature, dim=-1)
    if params.top_p < 1.0:
        ordered, order = torch.sort(probabilities, descending=True)
        # Keep the smallest set of tokens whose mass reaches top_p (the most likely always stays).
        outside = torch.cumsum(ordered, dim=-1) - ordered >= params.top_p
        ordered = ordered.masked_fill(outside, 0.0)
        choice = torch.multinomial(ordered, 1, generator=generator)
        return int(order[choice].item())
    return int(torch.multinomial(probabilities, 1, generator=generator).item())
