"""Built-in text data: real Wikipedia articles, split by article into train / calib / eval.

The Hugging Face Hub is out of reach, so the text comes from a real Wikipedia dump that the
`gensim` package ships as test data (about 100 English articles). Articles are assigned to splits
by a stable hash of their title, so the splits never overlap and never change between machines
or Python versions. Parsed splits are cached as JSON in the user cache.
"""

from __future__ import annotations

import bz2
import hashlib
import importlib.util
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import torch

from .errors import UserError
from .fileio import cache_dir, read_json, write_json_atomic

SPLITS = ("train", "calib", "eval")
DUMP_NAME = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
CACHE_VERSION = "wiki-v1"
MIN_CHARS = 2000
# share of articles per split, by hash bucket out of 100
_BUCKETS = {"train": range(0, 70), "calib": range(70, 85), "eval": range(85, 100)}


def _dump_path() -> Path:
    spec = importlib.util.find_spec("gensim")  # finds the package without importing it (slow)
    if spec is None or not spec.submodule_search_locations:
        raise UserError("the built-in text data needs gensim's Wikipedia test dump: pip install 'tokenskip[data]'")
    path = Path(list(spec.submodule_search_locations)[0]) / "test" / "test_data" / DUMP_NAME
    if not path.is_file():
        raise UserError(f"gensim is installed but its Wikipedia test dump is missing: {path}")
    return path


def _clean(wikitext: str) -> str:
    """Wiki markup -> plain paragraphs."""
    import mwparserfromhell

    text = mwparserfromhell.parse(wikitext).strip_code(normalize=True, collapse=True)
    text = re.sub(r"\[\[|\]\]|\{\{|\}\}", "", text)
    paragraphs = []
    for para in re.split(r"\n\s*\n", text):
        para = re.sub(r"[ \t]+", " ", para.replace("\n", " ")).strip()
        if len(para) >= 40 and not para.startswith(("Category:", "thumb|", "File:", "Image:")):
            paragraphs.append(para)
    return "\n\n".join(paragraphs)


def _parse_dump(path: Path) -> list[tuple[str, str]]:
    """(title, plain text) of every real article in the dump, in dump order."""
    articles = []
    with bz2.open(path, "rb") as f:
        for _, elem in ET.iterparse(f, events=("end",)):
            if not elem.tag.endswith("}page"):
                continue
            ns = elem.tag[: -len("page")]
            title = elem.findtext(f"{ns}title") or ""
            text = elem.findtext(f"{ns}revision/{ns}text") or ""
            elem.clear()
            if elem.find(f"{ns}redirect") is not None or text.lstrip().lower().startswith("#redirect"):
                continue
            if ":" in title:  # Wikipedia:, Template:, Category: ... pages
                continue
            plain = _clean(text)
            if len(plain) >= MIN_CHARS:
                articles.append((title, plain))
    return articles


def _bucket(title: str) -> int:
    return int(hashlib.sha256(title.encode("utf-8")).hexdigest(), 16) % 100


def _splits() -> dict[str, list[dict]]:
    cache = cache_dir() / "data" / CACHE_VERSION / "splits.json"
    if cache.is_file():
        return read_json(cache, "cached data splits")
    out: dict[str, list[dict]] = {name: [] for name in SPLITS}
    for title, text in _parse_dump(_dump_path()):
        b = _bucket(title)
        name = next(n for n, r in _BUCKETS.items() if b in r)
        out[name].append({"title": title, "text": text})
    write_json_atomic(cache, out)
    return out


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise UserError(f"unknown data split {split!r} (choose from {', '.join(SPLITS)})")


def load_split(split: str) -> list[str]:
    """Article texts of one split (train, calib or eval)."""
    _check_split(split)
    return [a["text"] for a in _splits()[split]]


def split_titles(split: str) -> list[str]:
    _check_split(split)
    return [a["title"] for a in _splits()[split]]


def read_text_file(path: str | Path) -> str:
    """A user's plain UTF-8 text file (for --text), refused early if it cannot be scored."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"--text {path}: no such file")
    if not path.is_file():
        raise UserError(f"--text {path}: not a regular file")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"--text {path}: not valid UTF-8 text (byte {exc.start}); convert it to UTF-8") from None
    if not text.strip():
        raise UserError(f"--text {path}: the file is empty")
    return text


def token_windows(tokenizer, texts: list[str], window: int, max_windows: int | None = None,
                  stride: int | None = None) -> torch.Tensor:
    """Texts -> non-overlapping token windows [N, window], each starting with BOS if the tokenizer
    has a distinct one. Texts are joined with EOS; the ragged tail is dropped."""
    if window < 2:
        raise UserError(f"window length {window}: must be at least 2")
    stride = stride or window
    bos = getattr(tokenizer, "bos_token_id", None)
    eos = getattr(tokenizer, "eos_token_id", None)
    use_bos = bos is not None and bos != eos
    body = window - 1 if use_bos else window
    step = stride - 1 if use_bos else stride
    stream: list[int] = []
    for i, text in enumerate(texts):
        if i and eos is not None:
            stream.append(eos)
        stream.extend(tokenizer.encode(text, add_special_tokens=False))
    if len(stream) < body:
        raise UserError(f"text has {len(stream)} tokens, need at least {body} for one window; "
                        "pass a longer --text or a smaller --seq-len")
    rows = []
    for start in range(0, len(stream) - body + 1, max(step, 1)):
        rows.append(([bos] if use_bos else []) + stream[start:start + body])
        if max_windows is not None and len(rows) >= max_windows:
            break
    return torch.tensor(rows, dtype=torch.long)
