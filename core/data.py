"""Built-in text data: real Wikipedia articles, split by article into train / calib / eval.

The Hugging Face Hub is out of reach, so the text comes from a real Wikipedia XML dump that the
`gensim` package ships as test data (about 100 English articles, roughly 3M characters of prose).
Why this shape:

* Splits are made by article, never by window, so no sentence of the evaluation text was seen
  while training or calibrating the router.
* An article's split comes from sha256 of its title: stable across machines, Python versions and
  PYTHONHASHSEED (Python's `hash()` is salted per process), and independent of dump order.
* Parsing the bz2 dump and stripping wiki markup takes seconds, so the result is cached once as
  JSON under `cache_dir()/data/wiki-v1/` (atomic write: an interrupted build leaves no half file).
  Bump `CACHE_VERSION` whenever cleaning or splitting changes, so stale caches are never read.
"""

from __future__ import annotations

import bz2
import hashlib
import importlib.util
import re
import xml.etree.ElementTree as ET
from pathlib import Path

from .errors import UserError
from .fileio import cache_dir, write_json_atomic

SPLITS = ("train", "calib", "eval")
# The second held-out domain (news) is read by evaluation only: no training or calibration step
# ever sees it, so a router tuned to one kind of text shows it.
NEWS_FILES = ("lee_background.cor", "lee.cor")  # gensim's Lee corpus: Australian news, one doc per line
CACHE_VERSION = "wiki-v2"
DUMP_GLOB = "enwiki-*-shortened.bz2"
INSTALL_HINT = "pip install 'tokenskip[data]'"
MIN_ARTICLE_CHARS = 2000  # shorter pages are stubs or near-empty after cleaning
MIN_PARAGRAPH_CHARS = 40  # drops headings, captions, stray list items and navigation lines
# Hash buckets out of 100 per split: about 60 / 15 / 25 articles (the eval split is large enough
# that method differences clear the bootstrap noise; train still has far more text than a fit reads).
_BUCKETS = {"train": range(0, 60), "calib": range(60, 75), "eval": range(75, 100)}
# Sections that are lists of citations or links rather than prose.
_BOILERPLATE_SECTIONS = {
    "references", "notes", "footnotes", "citations", "sources", "bibliography", "see also",
    "external links", "further reading", "notes and references", "references and notes",
    "works cited", "literature", "selected bibliography", "external link",
}
# Tags whose content is not running prose (citations, tables, formulas, galleries, ...).
_DROP_TAGS = {"ref", "references", "table", "gallery", "math", "imagemap", "timeline", "score",
              "syntaxhighlight", "source", "pre", "code", "chem", "ce", "graph", "templatedata"}
# Wikilink prefixes that are not article links (images, categories, interwiki, interlanguage).
_NON_ARTICLE_LINK = re.compile(r"^\s*:?\s*([a-z][a-z-]{1,11}|file|image|category|media|wikipedia|wiktionary"
                               r"|commons|wikt|template|help|portal|special|user|talk)\s*:", re.I)
# Markup that can survive when mwparserfromhell leaves a malformed construct as plain text.
_LEFTOVER_MARKUP = [
    (re.compile(r"<ref[^>/]*/>|<ref[^>]*>.*?</ref>", re.S | re.I), ""),
    (re.compile(r"<!--.*?-->", re.S), ""),
    (re.compile(r"</?[a-zA-Z][^>\n]*>"), ""),
    (re.compile(r"'{2,}"), ""),
    # an image link the parser gave up on: drop file name and options, keep the caption
    (re.compile(r"\[\[\s*(?:file|image|media)\s*:[^|\]]*\|(?:(?:thumb|thumbnail|frame|frameless|border|left"
                r"|right|center|centre|none|upright(?:=[\d.]+)?|\d*x?\d+px|alt=[^|\]]*)\|)*", re.I), ""),
    (re.compile(r"\[\[|\]\]|\{\{|\}\}|\{\||\|\}"), ""),
]
_TABLE_OR_MARKUP_LINE = re.compile(r"^\s*(\{\||\|\}|\|-|\||!|\{\{|\}\}|__[A-Z]+__)")

_memo: dict[Path, dict[str, list[dict]]] = {}


# --- locating and parsing the dump -------------------------------------------------------------

def _test_data_dir() -> Path:
    """gensim's test_data folder, found without importing gensim (its import is slow)."""
    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"the built-in text data needs gensim's test data: {INSTALL_HINT}")
    return Path(list(spec.submodule_search_locations)[0]) / "test" / "test_data"


def _dump_path() -> Path:
    """gensim's shipped Wikipedia dump."""
    folder = _test_data_dir()
    found = sorted(folder.glob(DUMP_GLOB))
    if not found:
        raise UserError(f"gensim is installed but has no Wikipedia test dump ({DUMP_GLOB}) in {folder}; "
                        f"reinstall it: {INSTALL_HINT}")
    return found[0]


def _iter_pages(path: Path):
    """(title, namespace, is_redirect, wikitext) per <page>, streamed so memory stays flat."""
    with bz2.open(path, "rb") as f:
        for _, elem in ET.iterparse(f, events=("end",)):
            if not elem.tag.endswith("}page") and elem.tag != "page":
                continue
            ns = elem.tag[: -len("page")]  # the XML namespace prefix, e.g. "{http://...}"
            title = (elem.findtext(f"{ns}title") or "").strip()
            namespace = (elem.findtext(f"{ns}ns") or "0").strip()
            wikitext = elem.findtext(f"{ns}revision/{ns}text") or ""
            redirect = elem.find(f"{ns}redirect") is not None or wikitext.lstrip().lower().startswith("#redirect")
            elem.clear()
            yield title, namespace, redirect, wikitext


def _is_article_page(title: str, namespace: str, redirect: bool) -> bool:
    """Main-namespace prose pages only: no redirects, disambiguation pages or bare lists."""
    if redirect or namespace != "0" or not title:
        return False
    return not (title.endswith("(disambiguation)") or title.startswith("List of "))


def _parse_dump(path: Path) -> list[tuple[str, str]]:
    """(title, plain text) of every kept article, in dump order, one entry per title."""
    articles: dict[str, str] = {}
    for title, namespace, redirect, wikitext in _iter_pages(path):
        if not _is_article_page(title, namespace, redirect) or title in articles:
            continue
        if len(wikitext) < MIN_ARTICLE_CHARS:  # cleaning only shortens, so skip the slow parse
            continue
        text = clean_wikitext(wikitext)
        if len(text) >= MIN_ARTICLE_CHARS:
            articles[title] = text
    return list(articles.items())


# --- wiki markup -> plain paragraphs -----------------------------------------------------------

def _heading_title(node) -> str:
    return node.title.strip_code().strip().lower()


def _prose(code) -> str:
    """Plain text of parsed wikitext, skipping what is not running prose.

    One linear walk over the node tree (repeated `Wikicode.remove` calls are quadratic on long
    pages): templates (infoboxes, citations), comments, headings, tables, references, formulas,
    image/category/interlanguage links and whole reference / link sections are left out.
    """
    from mwparserfromhell import nodes

    parts: list[str] = []
    skip_level = None  # heading level of the boilerplate section being skipped, if any
    for node in code.nodes:
        if isinstance(node, nodes.Heading):
            if skip_level is not None and node.level > skip_level:
                continue
            skip_level = node.level if _heading_title(node) in _BOILERPLATE_SECTIONS else None
            parts.append("\n\n")  # a heading always ends the paragraph before it
        elif skip_level is None:
            parts.append(_node_prose(node, nodes))
    return "".join(parts)


def _node_prose(node, nodes) -> str:
    if isinstance(node, nodes.Text):
        return str(node.value)
    if isinstance(node, nodes.HTMLEntity):
        return node.normalize()
    if isinstance(node, nodes.Wikilink):
        if _NON_ARTICLE_LINK.match(str(node.title)):
            return ""
        return _prose(node.text if node.text is not None else node.title)
    if isinstance(node, nodes.ExternalLink):
        return _prose(node.title) if node.title is not None else ""
    if isinstance(node, nodes.Tag):
        tag = str(node.tag).strip().lower()
        if tag in _DROP_TAGS:
            return ""
        if tag == "br":
            return " "
        return _prose(node.contents) if node.contents is not None else ""
    return ""  # Template, Comment, Argument and anything unknown


def _tidy_punctuation(para: str) -> str:
    """Repair what removed templates leave behind, e.g. "Achilles (;, Akhilleus,) was" or "( )"."""
    for _ in range(2):
        para = re.sub(r"\(\s*[;,]+\s*", "(", para)
        para = re.sub(r"\s*[;,]+\s*\)", ")", para)
        para = re.sub(r"\(\s*\)", "", para)
    para = re.sub(r"\s+([,.;:!?)])", r"\1", para)
    para = re.sub(r"\(\s+", "(", para)
    return re.sub(r"\s{2,}", " ", para).strip()


def _paragraphs(text: str) -> list[str]:
    """Blank-line separated paragraphs, each on one line with single spaces, prose only."""
    out = []
    for block in re.split(r"\n\s*\n", text):
        lines = [ln for ln in block.splitlines() if not _TABLE_OR_MARKUP_LINE.match(ln)]
        para = re.sub(r"\s+", " ", " ".join(lines)).strip()
        para = _tidy_punctuation(para)
        if len(para) >= MIN_PARAGRAPH_CHARS:
            out.append(para)
    return out


def clean_wikitext(wikitext: str) -> str:
    """Wiki markup -> plain prose paragraphs joined by "\\n\\n" (what a language model reads)."""
    try:
        import mwparserfromhell
    except ImportError:
        raise UserError(f"the built-in text data needs mwparserfromhell: {INSTALL_HINT}") from None
    text = _prose(mwparserfromhell.parse(wikitext))
    for pattern, repl in _LEFTOVER_MARKUP:
        text = pattern.sub(repl, text)
    return "\n\n".join(_paragraphs(text))


# --- splits and their cache --------------------------------------------------------------------

def _bucket(title: str) -> int:
    """0..99 from sha256(title): a stable, well-mixed, order-independent split key."""
    return int(hashlib.sha256(title.encode("utf-8")).hexdigest(), 16) % 100


def split_of(title: str) -> str:
    """Which split an article title belongs to (a pure function of the title)."""
    b = _bucket(title)
    return next(name for name, r in _BUCKETS.items() if b in r)


def _build_splits() -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {name: [] for name in SPLITS}
    for title, text in _parse_dump(_dump_path()):
        out[split_of(title)].append({"title": title, "text": text})
    return out


def _cache_file() -> Path:
    return cache_dir() / "data" / CACHE_VERSION / "splits.json"


def _read_cache(path: Path) -> dict[str, list[dict]] | None:
    """The cached splits, or None if missing or unreadable (then they are simply rebuilt)."""
    import json

    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
        splits = obj["splits"]
        if obj.get("version") == CACHE_VERSION and all(
                isinstance(splits[s], list) and all({"title", "text"} <= set(a) for a in splits[s])
                for s in SPLITS):
            return splits
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return None


def _splits() -> dict[str, list[dict]]:
    """All splits, from memory, the JSON cache, or (once) the dump itself."""
    path = _cache_file()
    if path in _memo:
        return _memo[path]
    splits = _read_cache(path)
    if splits is None:
        splits = _build_splits()
        write_json_atomic(path, {"version": CACHE_VERSION, "source": _dump_path().name, "splits": splits})
    _memo[path] = splits
    return splits


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise UserError(f"unknown data split {split!r} (choose from {', '.join(SPLITS)})")


def load_split(split: str) -> list[str]:
    """Article texts of one split ("train", "calib" or "eval"), in a fixed order."""
    _check_split(split)
    return [a["text"] for a in _splits()[split]]


def load_news() -> list[str]:
    """The second held-out domain: gensim's Lee news corpus, one document per line (evaluation only)."""
    docs: list[str] = []
    for name in NEWS_FILES:
        path = _test_data_dir() / name
        if not path.is_file():
            raise UserError(f"gensim is installed but has no {name} in {path.parent}; reinstall it: {INSTALL_HINT}")
        docs += [ln.strip() for ln in path.read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip()]
    return docs


def split_titles(split: str) -> list[str]:
    """Article titles of one split, in the same order as `load_split`."""
    _check_split(split)
    return [a["title"] for a in _splits()[split]]


# --- user text ----------------------------------------------------------------------------------

def read_text_file(path: str | Path) -> str:
    """A user's plain UTF-8 text file (for --text), refused early with a one-line reason."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"--text {path}: no such file")
    if path.is_dir():
        raise UserError(f"--text {path}: is a directory, not a text file")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise UserError(f"--text {path}: cannot read it ({exc.strerror or exc})") from None
    try:
        text = raw.decode("utf-8-sig")  # tolerate a UTF-8 byte-order mark
    except UnicodeDecodeError as exc:
        raise UserError(f"--text {path}: not valid UTF-8 text (bad byte at offset {exc.start}); "
                        "convert it to UTF-8") from None
    if not text.strip():
        raise UserError(f"--text {path}: the file is empty or only whitespace")
    return text
