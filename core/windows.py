"""Token windows: the unit of text every evaluation, calibration and training step reads.

Two ways to cut text into windows of L tokens:
- `sample_windows` (what evaluation, calibration and training use): seeded, across every article
  of a split, never overlapping;
- `token_windows`: the first N consecutive windows of a stream (export validation, fixed inputs).
"""

from __future__ import annotations

import torch

from .data import SPLITS, load_news, load_split, read_text_file
from .errors import UserError


def _token_stream(tokenizer, texts: list[str], eos: int | None, need: int | None) -> list[int]:
    """Texts tokenized without special tokens, joined by EOS; stops once `need` tokens exist."""
    stream: list[int] = []
    for i, text in enumerate(texts):
        if i and eos is not None:
            stream.append(int(eos))
        stream.extend(int(t) for t in tokenizer.encode(text, add_special_tokens=False))
        if need is not None and len(stream) >= need:
            break
    return stream


def token_windows(tokenizer, texts: list[str], window: int, max_windows: int | None = None,
                  stride: int | None = None) -> torch.Tensor:
    """Texts -> token windows, a LongTensor [N, window], deterministic.

    Texts are joined with EOS so a window may span an article boundary the way a model sees one.
    If the tokenizer has a BOS distinct from EOS, every window starts with it followed by
    window - 1 text tokens, as a fresh prompt would. `stride` counts window positions between
    window starts (default `window`: no overlap); the ragged tail is dropped; the first
    `max_windows` windows are kept.
    """
    if window < 2:
        raise UserError(f"window length {window}: must be at least 2 (--seq-len)")
    if stride is not None and stride < 1:
        raise UserError(f"window stride {stride}: must be at least 1")
    if max_windows is not None and max_windows < 1:
        raise UserError(f"max windows {max_windows}: must be at least 1")
    bos = getattr(tokenizer, "bos_token_id", None)
    eos = getattr(tokenizer, "eos_token_id", None)
    prefix = [int(bos)] if bos is not None and bos != eos else []
    body = window - len(prefix)  # text tokens per window
    step = max((stride or window) - len(prefix), 1)  # text tokens between window starts
    need = None if max_windows is None else body + (max_windows - 1) * step
    stream = _token_stream(tokenizer, texts, eos, need)
    if len(stream) < body:
        raise UserError(f"text has {len(stream)} tokens, need at least {body} for one window "
                        f"of {window}; pass a longer --text or a smaller --seq-len")
    starts = range(0, len(stream) - body + 1, step)
    if max_windows is not None:
        starts = starts[:max_windows]
    return torch.tensor([prefix + stream[s:s + body] for s in starts], dtype=torch.long)


WINDOW_SOURCES = (*SPLITS, "news")  # built-in splits, and the held-out news domain


def load_windows(tokenizer, source: str, seq_len: int, count: int, seed: int = 0,
                 text_file: str | None = None) -> torch.Tensor:
    """Token windows [N, seq_len] for evaluation, calibration or training, sampled by seed.

    `source` is a built-in split ("train", "calib", "eval") or the held-out news domain ("news");
    `text_file` (a user's UTF-8 file, --text) replaces it. Windows come from `sample_windows`.
    """
    if text_file:
        texts = [read_text_file(text_file)]
    elif source in SPLITS:
        texts = load_split(source)
    elif source == "news":
        texts = load_news()
    else:
        raise UserError(f"unknown text source {source!r} (choose from {', '.join(WINDOW_SOURCES)})")
    return sample_windows(tokenizer, texts, seq_len, count, seed)[0]


def sample_windows(tokenizer, texts: list[str], window: int, count: int, seed: int = 0) -> tuple[torch.Tensor, list[int]]:
    """`count` windows [N, window] drawn by seed across EVERY text (article), never overlapping.

    The texts are joined into one token stream (EOS between them, the way a model sees a document
    boundary) and cut into a grid of non-overlapping windows at a seeded offset. Each grid window
    belongs to the text it starts in; texts are visited round-robin in a seeded order and each
    visit takes one of that text's windows at random. So a few windows already cover many
    articles, windows never share a token, and short texts (news items) are packed several to a
    window. Windows start with BOS when the tokenizer has one distinct from EOS (a fresh prompt).
    Returns (ids, the text index of each window).
    """
    import bisect
    import random

    if window < 2:
        raise UserError(f"window length {window}: must be at least 2 (--seq-len)")
    if count < 1:
        raise UserError(f"windows {count}: must be at least 1")
    bos = getattr(tokenizer, "bos_token_id", None)
    eos = getattr(tokenizer, "eos_token_id", None)
    prefix = [int(bos)] if bos is not None and bos != eos else []
    body = window - len(prefix)
    stream: list[int] = []
    starts: list[int] = []  # where each text begins in the stream
    for i, text in enumerate(texts):
        if i and eos is not None:
            stream.append(int(eos))
        starts.append(len(stream))
        stream.extend(int(t) for t in tokenizer.encode(text, add_special_tokens=False))
    if len(stream) < body:
        raise UserError(f"text has {len(stream)} tokens, need at least {body} for one window "
                        f"of {window}; pass a longer --text or a smaller --seq-len")
    rng = random.Random(seed)
    offset = rng.randrange(min(body, len(stream) - body + 1))
    slots: dict[int, list[int]] = {}
    for s in range(offset, len(stream) - body + 1, body):
        slots.setdefault(bisect.bisect_right(starts, s) - 1, []).append(s)
    for owned in slots.values():
        rng.shuffle(owned)
    order = sorted(slots)
    rng.shuffle(order)
    rows, owner = [], []
    while len(rows) < count and any(slots[i] for i in order):
        for i in order:
            if slots[i] and len(rows) < count:
                s = slots[i].pop()
                rows.append(prefix + stream[s:s + body])
                owner.append(i)
    return torch.tensor(rows, dtype=torch.long), owner
