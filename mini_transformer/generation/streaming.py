"""Token ids in, text pieces out: incremental detokenization and stop strings.

The engine yields token ids; these helpers turn them into text as it is produced, given only a
``decode(ids) -> str`` callable (the tokenizer's, with ``errors="replace"``).

Why not ``decode([token])`` per token: a byte-level or BPE token can hold part of a multi-byte
UTF-8 character (it decodes to U+FFFD until the rest arrives), and BPE decoders may join tokens
differently from one at a time. :class:`TextStreamer` therefore decodes a short window of recent
tokens and emits only the text that is final: a trailing U+FFFD is held back until the character
completes (or until :meth:`TextStreamer.flush` at the end, when it is real).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence

REPLACEMENT = "\ufffd"


class TextStreamer:
    """Incremental detokenizer: :meth:`put` a token id, get the newly final text (maybe "")."""

    def __init__(self, decode: Callable[[list[int]], str]):
        self.decode = decode
        self.ids: list[int] = []
        # ids[prefix:read] is text already emitted, kept as context for the decoder;
        # ids[read:] is not emitted yet.
        self.prefix = 0
        self.read = 0

    def put(self, token: int) -> str:
        self.ids.append(token)
        emitted = self.decode(self.ids[self.prefix:self.read])
        text = self.decode(self.ids[self.prefix:])
        if len(text) <= len(emitted) or text.endswith(REPLACEMENT):
            return ""  # nothing new, or the last character is still incomplete
        self.prefix, self.read = self.read, len(self.ids)
        return text[len(emitted):]

    def flush(self) -> str:
        """The text still held back (an incomplete character at the very end becomes U+FFFD)."""
        emitted = self.decode(self.ids[self.prefix:self.read])
        text = self.decode(self.ids[self.prefix:])
        self.prefix = self.read = len(self.ids)
        return text[len(emitted):]


class StopStrings:
    """Cuts a text stream at the first stop string; the stop string itself is never emitted.

    Text that could be the beginning of a stop string is held back until it is clear either way.
    """

    def __init__(self, stops: Iterable[str]):
        self.stops = [s for s in stops if s]
        self.pending = ""
        self.stopped = False

    def feed(self, piece: str) -> str:
        """Add a piece of text; return what can be shown now. Sets :attr:`stopped` on a match."""
        if self.stopped:
            return ""
        self.pending += piece
        if not self.stops:
            out, self.pending = self.pending, ""
            return out
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped = True
            out, self.pending = self.pending[:min(hits)], ""
            return out
        hold = self._partial_match_start()
        out, self.pending = self.pending[:hold], self.pending[hold:]
        return out

    def flush(self) -> str:
        out, self.pending = ("" if self.stopped else self.pending), ""
        return out

    def _partial_match_start(self) -> int:
        """Where the longest suffix of ``pending`` that starts some stop string begins."""
        text = self.pending
        for start in range(max(0, len(text) - max(len(s) for s in self.stops) + 1), len(text)):
            tail = text[start:]
            if any(s.startswith(tail) for s in self.stops):
                return start
        return len(text)


def stream_text(tokens: Iterable[int], decode: Callable[[list[int]], str],
                stop: Sequence[str] = ()) -> Iterator[str]:
    """Text pieces for a stream of token ids, ending at the first stop string (not included).

    When a stop string appears, the token iterator is closed, which ends generation.
    """
    streamer = TextStreamer(decode)
    stops = StopStrings(stop)
    iterator = iter(tokens)
    try:
        for token in iterator:
            piece = stops.feed(streamer.put(token))
            if piece:
                yield piece
            if stops.stopped:
                return
        piece = stops.feed(streamer.flush())
        piece += stops.flush()
        if piece:
            yield piece
    finally:
        close = getattr(iterator, "close", None)
        if close is not None:
            close()


def truncate_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    """``text`` up to the first stop string, and whether one was found."""
    hits = [i for i in (text.find(s) for s in stop if s) if i >= 0]
    return (text[:min(hits)], True) if hits else (text, False)
