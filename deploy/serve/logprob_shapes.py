"""Log-prob entries (logprobs.py) -> OpenAI's wire shapes: the legacy completions object
(tokens, token_logprobs, top_logprobs, text_offset) and chat's `content` list.

A token's string is its own decoded text with special tokens spelled out; a byte-level BPE token
that holds part of a multi-byte character decodes to U+FFFD (its `bytes` are then those of the
replacement character, not the raw bytes: OpenAI's raw-byte spelling is not reproduced).
"""

from __future__ import annotations

from functools import lru_cache

from .logprobs import can_score
from .protocol import ChatLogprobs, ChatTokenLogprob, CompletionLogprobs, TopLogprob, bad_request


def check_scoring(backend) -> None:
    """A 400 naming `echo` when this backend cannot give a prompt's log-probs."""
    if not can_score(backend):
        raise bad_request(f"'echo' with 'logprobs' needs the prompt's log-probs, which this server computes on the "
                          f"PyTorch backend only (this one is {getattr(backend, 'name', type(backend).__name__)}); "
                          "drop logprobs or echo", "echo")


class TokenText:
    """Token id -> its own text (special tokens spelled out), cached: the strings logprobs report."""

    def __init__(self, tokenizer) -> None:
        self.text = lru_cache(maxsize=65536)(
            lambda i: tokenizer.decode([i], skip_special_tokens=False, clean_up_tokenization_spaces=False))

    def completion(self, entries: list[Entry], offset: int) -> tuple[CompletionLogprobs, int]:
        """The legacy shape; text_offset runs on from `offset` (returned for the next chunk)."""
        out = CompletionLogprobs()
        for tok, lp, alts in entries:
            s = self.text(tok)
            out.tokens.append(s)
            out.token_logprobs.append(lp)
            if lp is None:
                out.top_logprobs.append(None)
            else:  # the alternatives and the chosen token, as OpenAI reports them
                top = {self.text(i): v for i, v in alts or []}
                top.setdefault(s, lp)
                out.top_logprobs.append(top)
            out.text_offset.append(offset)
            offset += len(s)
        return out, offset

    def chat(self, entries: list[Entry]) -> ChatLogprobs:
        def one(i, v):
            s = self.text(i)
            return s, v, list(s.encode("utf-8"))

        content = []
        for tok, lp, alts in entries:
            s, v, b = one(tok, lp)
            content.append(ChatTokenLogprob(token=s, logprob=v, bytes=b,
                                            top_logprobs=[TopLogprob(token=t, logprob=x, bytes=y)
                                                          for t, x, y in (one(i, a) for i, a in alts or [])]))
        return ChatLogprobs(content=content)
