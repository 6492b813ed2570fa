"""Token ids -> text deltas, incrementally, with stop strings, for streaming.

Decoding the whole output again on every token is quadratic in its length. Instead each new token
decodes only a window of recent tokens, as Hugging Face's text-generation-inference and vLLM's
incremental detokenizer do: the text of window[prefix:read] is known (already released), the text
of window[prefix:] is decoded, and the difference is the new text. Decoding a few tokens of left
context (rather than the new token alone) keeps what a tokenizer does at token boundaries right:
SentencePiece's leading space, byte-level BPE's merged characters. The window starts on the tail of
the prompt, so the first generated token gets its context too.

A multi-byte character that byte-level BPE spreads over several tokens decodes to U+FFFD until it
is complete: such text is held back (at most MAX_HELD tokens, past which the bytes are not going to
form a character and are released as they decode). A tail that could still grow into a stop
string is held back too; when a stop string appears, the text ends right before it (OpenAI: the
stop sequence is not part of the text) and the sequence is finished ("stop"). Everything kept is
bounded by the longest stop string plus a few tokens, so each token costs O(1) work.
"""

from __future__ import annotations

REPLACEMENT = "\ufffd"
PROMPT_CONTEXT = 5  # prompt tokens decoded as left context of the first generated tokens (as vLLM)
MAX_HELD = 6  # tokens an incomplete UTF-8 sequence may hold back (a character is at most 4 bytes)


class IncrementalDecoder:
    """Token ids -> new text per token, decoding a bounded window (TGI's prefix/read offsets)."""

    def __init__(self, tokenizer, context: list[int] = (), skip_special_tokens: bool = True) -> None:
        self.tokenizer, self.skip = tokenizer, skip_special_tokens
        self.ids: list[int] = list(context[-PROMPT_CONTEXT:]) if context else []
        self.prefix = 0  # window start: left context only, its text is not new
        self.read = len(self.ids)  # tokens before this are released

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip, clean_up_tokenization_spaces=False)

    def push(self, token: int | None, final: bool = False) -> str:
        """The text `token` completes (held back while it ends in an incomplete character)."""
        if token is not None:
            self.ids.append(token)
        if self.read == len(self.ids):
            return ""
        known = self._decode(self.ids[self.prefix:self.read])
        text = self._decode(self.ids[self.prefix:])
        stuck = len(self.ids) - self.read > MAX_HELD
        if not (final or stuck) and (len(text) <= len(known) or text.endswith(REPLACEMENT)):
            return ""  # nothing new yet (a special token skipped, or a character still incomplete)
        new = text[len(known):]
        self.prefix, self.read = self.read, len(self.ids)
        # keep the window short: drop the tokens the next decode no longer needs
        if self.prefix > 4 * PROMPT_CONTEXT:
            self.ids, self.read, self.prefix = self.ids[self.prefix:], self.read - self.prefix, 0
        return new


class TextStream:
    """Generated token ids -> released text deltas, ending at the first stop string."""

    def __init__(self, tokenizer, stops: list[str], prompt: list[int] = (), skip_special_tokens: bool = True) -> None:
        self.decoder = IncrementalDecoder(tokenizer, prompt, skip_special_tokens)
        self.stops = stops
        self.tokens: list[int] = []
        self.pending = ""  # decoded but not yet released (a possible stop-string start)
        self.stopped = False  # a stop string matched: the text is final

    def push(self, token: int | None, final: bool = False, count_only: bool = False) -> str:
        """Add a token (None: no new token) and return the text now safe to release.
        count_only: the token counts (usage, logprobs) but adds no text (a stop token id)."""
        if self.stopped:
            return ""
        if token is not None:
            self.tokens.append(token)
        self.pending += self.decoder.push(None if count_only else token, final)
        if self.stops:
            hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
            if hits:
                self.stopped = True
                return self._release(min(hits), keep=0)
        if final:
            return self._release(len(self.pending), keep=0)
        hold = 0
        for stop in self.stops:  # the longest tail that is the start of a stop string
            for n in range(min(len(stop) - 1, len(self.pending)), hold, -1):
                if self.pending.endswith(stop[:n]):
                    hold = n
                    break
        return self._release(len(self.pending) - hold, keep=hold)

    def _release(self, upto: int, keep: int) -> str:
        delta = self.pending[:upto]
        self.pending = self.pending[len(self.pending) - keep:] if keep else ""
        return delta
