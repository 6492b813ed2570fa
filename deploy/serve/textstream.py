"""Token ids -> text deltas, with stop strings, for streaming.

A delta is only released once it can no longer change: text ending in an incomplete UTF-8
sequence (byte-level BPE emits multi-byte characters over several tokens, decoded as U+FFFD
until complete) is held back, and so is a tail that could still grow into a stop string. When a
stop string appears, the text ends right before it and the sequence is finished ("stop").
"""

from __future__ import annotations

REPLACEMENT = "\ufffd"


class TextStream:
    def __init__(self, tokenizer, stops: list[str]) -> None:
        self.tokenizer = tokenizer
        self.stops = stops
        self.tokens: list[int] = []
        self.sent = ""  # text already released
        self.stopped = False  # a stop string matched: the text is final

    def _decode(self) -> str:
        return self.tokenizer.decode(self.tokens, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def push(self, token: int | None, final: bool = False) -> str:
        """Add a token (None: no new token) and return the text now safe to release."""
        if self.stopped:
            return ""
        if token is not None:
            self.tokens.append(token)
        text = self._decode()
        if self.stops:
            start = max(0, len(self.sent) - max(len(s) for s in self.stops))
            hits = [i for i in (text.find(s, start) for s in self.stops) if i >= 0]
            if hits:
                self.stopped = True
                return self._release(text[:min(hits)])
        if final:
            return self._release(text)
        hold = len(text) - len(text.rstrip(REPLACEMENT))
        for stop in self.stops:  # the longest tail that is the start of a stop string
            for n in range(min(len(stop) - 1, len(text)), 0, -1):
                if text.endswith(stop[:n]):
                    hold = max(hold, n)
                    break
        return self._release(text[:len(text) - hold])

    def _release(self, upto: str) -> str:
        if len(upto) <= len(self.sent) or not upto.startswith(self.sent):
            return ""  # nothing new (or decoding re-spelled released text: never retract it)
        delta, self.sent = upto[len(self.sent):], upto
        return delta
