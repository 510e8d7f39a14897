"""The pure parts of generation: the text a sequence may send, and how its next token is chosen."""

from __future__ import annotations

import torch

from model_api.generation.sampling import SamplingParams, next_token
from model_api.generation.text import TextStream


def feed(stream: TextStream, pieces: list[str]) -> str:
    """The text sent when the decoded text grows by `pieces`, the last one final."""
    full, sent = "", ""
    for number, piece in enumerate(pieces):
        full += piece
        sent += stream.advance(full, final=number == len(pieces) - 1)
    return sent


def test_without_stops_everything_is_sent_as_it_comes() -> None:
    stream = TextStream()
    assert stream.advance("Hel") == "Hel"
    assert stream.advance("Hello") == "lo"
    assert stream.text == "Hello" and not stream.stopped


def test_a_stop_split_over_tokens_is_never_sent() -> None:
    stream = TextStream(stops=("END",))
    assert feed(stream, ["one ", "two E", "N", "D three"]) == "one two "
    assert stream.stopped


def test_a_false_start_of_a_stop_is_sent_once_it_cannot_match() -> None:
    stream = TextStream(stops=("END",))
    assert stream.advance("one EN") == "one "
    assert stream.advance("one ENTRY") == "ENTRY"


def test_the_earliest_of_several_stops_ends_the_text() -> None:
    assert feed(TextStream(stops=("c", "b")), ["abcd"]) == "a"


def test_held_back_text_is_sent_when_the_answer_ends() -> None:
    assert feed(TextStream(stops=("END",)), ["done E"]) == "done E"


def test_half_a_character_waits_for_the_rest() -> None:
    stream = TextStream()
    assert stream.advance("caf\ufffd") == "caf"
    assert stream.advance("café") == "é"


def test_greedy_takes_the_most_likely_token() -> None:
    logits = torch.tensor([0.1, 3.0, 0.2])
    params = SamplingParams(max_tokens=1, temperature=0.0)
    assert params.generator(0, torch.device("cpu")) is None
    assert next_token(logits, params, None) == 1


def test_a_seed_draws_the_same_tokens_again() -> None:
    logits = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    params = SamplingParams(max_tokens=1, temperature=1.0, seed=42)

    def draws() -> list[int]:
        generator = params.generator(0, torch.device("cpu"))
        return [next_token(logits, params, generator) for _ in range(20)]

    assert draws() == draws()
    other = params.generator(1, torch.device("cpu"))  # the next choice draws differently
    assert [next_token(logits, params, other) for _ in range(20)] != draws()


def test_a_tiny_top_p_keeps_only_the_most_likely_token() -> None:
    logits = torch.tensor([0.0, 2.0, 1.0, 1.5])
    params = SamplingParams(max_tokens=1, temperature=1.0, top_p=0.01, seed=1)
    generator = params.generator(0, torch.device("cpu"))
    assert {next_token(logits, params, generator) for _ in range(20)} == {1}
