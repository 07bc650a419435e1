"""Incremental detokenization with stop strings, one instance per sequence.

Text is emitted as the difference between successive decodes of all output
tokens, so multi-token characters and WordPiece joins come out right. Text that
ends in an incomplete character (U+FFFD) is held back, and so are the last
`len(longest stop string) - 1` characters, which could be the start of a stop
string; both are flushed when the sequence ends. A stop string ends the sequence
and is cut from the output, together with anything after it. `decode` replaces the
tokenizer's decode where the text is defined otherwise (grammar-constrained output:
`grammar.GrammarState.decode`).
"""

from __future__ import annotations

from collections.abc import Callable


class IncrementalDetokenizer:
    def __init__(self, tokenizer, stop: tuple[str, ...] = (), *,
                 decode: Callable[[list[int]], str] | None = None) -> None:
        self._tokenizer = tokenizer
        self._decode_ids = decode
        self._stop = stop
        self._holdback = max((len(s) for s in stop), default=1) - 1
        self._ids: list[int] = []
        self.emitted = ""  # text handed out so far
        self.stopped = False  # a stop string was found

    def _decode(self) -> str:
        if self._decode_ids is not None:
            return self._decode_ids(self._ids)
        return self._tokenizer.decode(self._ids, skip_special_tokens=True)

    def add(self, token_id: int) -> str:
        """Appends a token; returns the new text that is safe to hand out."""
        self._ids.append(token_id)
        full = self._decode()
        if self._stop:
            start = max(0, len(self.emitted) - self._holdback)
            hits = [i for i in (full.find(s, start) for s in self._stop) if i >= 0]
            if hits:
                self.stopped = True
                return self._emit(full[:min(hits)])
        if full.endswith("\ufffd"):
            return ""
        return self._emit(full[:len(full) - self._holdback] if self._holdback else full)

    def flush(self) -> str:
        """At the end of the sequence: whatever was held back."""
        if self.stopped:
            return ""
        return self._emit(self._decode().rstrip("\ufffd"))

    def _emit(self, text: str) -> str:
        if len(text) <= len(self.emitted) or not text.startswith(self.emitted):
            # Nothing new, or the tokenizer rewrote earlier text (space clean-up): never retract.
            return ""
        delta = text[len(self.emitted):]
        self.emitted = text
        return delta
