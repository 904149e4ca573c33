"""Stage 3 of the pipeline: generated token ids → text deltas, with stop strings applied.

:class:`TextOutput` chains the incremental detokenizer
(:class:`~tandem.engine.tokenizer.IncrementalDetokenizer`: UTF-8 safe, special tokens skipped)
and a :class:`StopStringMatcher`: each :meth:`TextOutput.feed` returns the text that is final
and safe to send, and whether a stop string matched (the text is then cut just before it).
No I/O here.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

from tandem.engine.tokenizer import IncrementalDetokenizer, Tokenizer

__all__ = ["StopStringMatcher", "TextDelta", "TextOutput"]


class StopStringMatcher:
    """Applies stop strings to text that arrives in pieces.

    :meth:`feed` returns the text that is safe to emit and whether a stop string matched (the
    text is then cut just before the earliest match). Text that might be the start of a stop
    string is held back until it is disambiguated; :meth:`flush` releases it at the end.
    """

    def __init__(self, stops: list[str]) -> None:
        self.stops = [s for s in stops if s]
        self._held = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """Add ``text``; return ``(emit, matched)``."""
        if not self.stops:
            return text, False
        buf = self._held + text
        cut = min((i for i in (buf.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self._held = ""
            return buf[:cut], True
        hold = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(buf)), hold, -1):
                if buf.endswith(s[:k]):
                    hold = k
                    break
        self._held = buf[len(buf) - hold :] if hold else ""
        return buf[: len(buf) - hold], False

    def flush(self) -> str:
        """Release the held-back text (the stream ended without a match)."""
        held, self._held = self._held, ""
        return held


class TextDelta(NamedTuple):
    """New output text and whether a stop string ended the output (``text`` stops before it)."""

    text: str
    stopped: bool


class TextOutput:
    """Token ids in, final text deltas out: detokenize incrementally, then apply stop strings."""

    def __init__(self, tokenizer: Tokenizer, stops: list[str]) -> None:
        self._detok = IncrementalDetokenizer(tokenizer)
        self._stops = StopStringMatcher(stops)

    def feed(self, token_ids: Sequence[int], *, final: bool = False) -> TextDelta:
        """Add the next generated ids; ``final`` (the last chunk) releases everything held back.

        After a delta with ``stopped`` the output is over: feed nothing more.
        """
        # Special tokens (eos, chat markers) are not text: the detokenizer skips them.
        new_text = self._detok.add(token_ids) if token_ids else ""
        if final:
            new_text += self._detok.flush()
        text, matched = self._stops.feed(new_text)
        if matched:
            return TextDelta(text, True)
        if final:
            text += self._stops.flush()
        return TextDelta(text, False)
