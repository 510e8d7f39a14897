"""The text of a sequence as it is generated: what may be sent now, and where a stop sequence ends it.

Pure code: the caller decodes the generated token ids to text after every step and hands the whole
text to `TextStream.advance`, which answers the part that is safe to send. Text is held back while it
could still become a stop sequence, or while it ends in half a UTF-8 character (the decoder's U+FFFD).
A stop sequence is never sent, as OpenAI does.

>>> stream = TextStream(stops=("\\n\\n",))
>>> stream.advance("Hello")
'Hello'
>>> stream.advance("Hello\\n")     # could be the start of the stop sequence
''
>>> stream.advance("Hello\\nWorld")
'\\nWorld'
>>> stream.advance("Hello\\nWorld\\n\\nMore"), stream.stopped
('', True)
>>> stream.text
'Hello\\nWorld'
"""

from __future__ import annotations

REPLACEMENT = "\ufffd"


class TextStream:
    """The sent text of one sequence and whether a stop sequence has ended it."""

    def __init__(self, stops: tuple[str, ...] = ()) -> None:
        self.stops = tuple(stop for stop in stops if stop)
        self.text = ""  # everything sent so far
        self.stopped = False

    def _held_back(self, full: str) -> int:
        """How many trailing characters of `full` may still become a stop sequence."""
        longest = 0
        for stop in self.stops:
            for size in range(min(len(stop) - 1, len(full)), longest, -1):
                if full.endswith(stop[:size]):
                    longest = size
                    break
        return longest

    def advance(self, full: str, final: bool = False) -> str:
        """The new text to send, given the whole decoded text so far; `final`: nothing more will come."""
        if self.stopped:
            return ""
        # A stop sequence may start inside text already held back, never inside text already sent.
        search_from = max(0, len(self.text) - max((len(stop) for stop in self.stops), default=0))
        ends = [index for stop in self.stops if (index := full.find(stop, search_from)) >= 0]
        if ends:
            self.stopped = True
            end = min(ends)
        elif final:
            end = len(full)
        else:
            end = len(full) - self._held_back(full)
            while end > len(self.text) and full[end - 1] == REPLACEMENT:
                end -= 1  # half a character: wait for the rest of its bytes
        if end <= len(self.text) or not full.startswith(self.text):
            # Nothing new, or the decoder revised earlier text (never sent twice).
            return ""
        delta = full[len(self.text) : end]
        self.text = full[:end]
        return delta
