"""Built-in Wikipedia splits, --text files and token windows (no model needed).

The splits are built once per test session into a temporary TOKENSKIP_CACHE, so the tests never
depend on (or touch) the user's cache.
"""

from __future__ import annotations

import itertools
import json

import pytest
import torch

from tokenskip import data, windows
from tokenskip.errors import UserError

pytest.importorskip("mwparserfromhell")
if data.importlib.util.find_spec("gensim") is None:
    pytest.skip("gensim (its Wikipedia test dump) is not installed", allow_module_level=True)


def _use_cache(monkeypatch, path):
    monkeypatch.setenv("TOKENSKIP_CACHE", str(path))
    monkeypatch.setattr(data, "_memo", {})


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """All splits built from the dump in a fresh temporary cache: {split: (titles, texts)}."""
    mp = pytest.MonkeyPatch()
    cache = tmp_path_factory.mktemp("cache-a")
    _use_cache(mp, cache)
    try:
        yield cache, {s: (data.split_titles(s), data.load_split(s)) for s in data.SPLITS}
    finally:
        mp.undo()


def test_splits_non_empty_and_roughly_60_15_25(built):
    _, splits = built
    sizes = {s: len(titles) for s, (titles, _) in splits.items()}
    assert all(n > 0 for n in sizes.values()), sizes
    assert sum(sizes.values()) >= 60, sizes
    assert sizes["train"] > sizes["eval"] > sizes["calib"], sizes
    assert sizes["eval"] >= 20, sizes  # enough articles that windows can span many topics
    for titles, texts in splits.values():
        assert len(titles) == len(texts)
        assert all(len(t) >= data.MIN_ARTICLE_CHARS for t in texts)


def test_splits_disjoint_by_title_and_text(built):
    _, splits = built
    for a, b in itertools.combinations(data.SPLITS, 2):
        assert not set(splits[a][0]) & set(splits[b][0]), (a, b)
        assert not set(splits[a][1]) & set(splits[b][1]), (a, b)
    all_titles = [t for titles, _ in splits.values() for t in titles]
    assert len(all_titles) == len(set(all_titles))


def test_split_is_a_function_of_the_title(built):
    _, splits = built
    for name, (titles, _) in splits.items():
        assert all(data.split_of(t) == name for t in titles)


def test_text_is_clean_prose(built):
    _, splits = built
    text = "\n".join(t for _, texts in splits.values() for t in texts)
    for leftover in ("[[", "]]", "{{", "}}", "{|", "|}", "<ref", "</", "''", "==", "thumb|", "Category:"):
        assert leftover not in text, leftover
    for article in splits["eval"][1]:
        assert article == article.strip() and "\n\n\n" not in article
        assert all(p and "\n" not in p and "  " not in p for p in article.split("\n\n"))
    titles = {t for titles, _ in splits.values() for t in titles}
    assert not any(t.endswith("(disambiguation)") or t.startswith("List of ") for t in titles)


def test_deterministic_across_calls_and_from_cache(built, monkeypatch):
    cache, splits = built
    assert (cache / "data" / data.CACHE_VERSION / "splits.json").is_file()
    for s in data.SPLITS:  # second call in-process (memo)
        _use_cache(monkeypatch, cache)
        assert data.split_titles(s) == splits[s][0] and data.load_split(s) == splits[s][1]
    _use_cache(monkeypatch, cache)  # fresh process view: read back from the JSON file
    assert data.load_split("eval") == splits["eval"][1]


def test_deterministic_across_a_cache_rebuild(built, tmp_path, monkeypatch):
    """A rebuild into another TOKENSKIP_CACHE gives the same articles in the same splits.

    Only the first pages of the dump are re-parsed, to keep the test fast; the split of a title
    must not depend on which other pages exist.
    """
    _, splits = built
    real_iter = data._iter_pages
    monkeypatch.setattr(data, "_iter_pages", lambda path: itertools.islice(real_iter(path), 90))
    _use_cache(monkeypatch, tmp_path)
    rebuilt = {s: dict(zip(data.split_titles(s), data.load_split(s))) for s in data.SPLITS}
    assert sum(map(len, rebuilt.values())) >= 5
    for s in data.SPLITS:
        full = dict(zip(*splits[s]))
        assert rebuilt[s] == {t: full[t] for t in splits[s][0] if t in rebuilt[s]}
        assert list(rebuilt[s]) == [t for t in splits[s][0] if t in rebuilt[s]]  # same order
    assert json.loads((tmp_path / "data" / data.CACHE_VERSION / "splits.json").read_text())["version"] \
        == data.CACHE_VERSION


def test_corrupt_cache_is_rebuilt(tmp_path, monkeypatch):
    path = tmp_path / "data" / data.CACHE_VERSION / "splits.json"
    path.parent.mkdir(parents=True)
    path.write_text("{not json")
    monkeypatch.setattr(data, "_iter_pages", lambda p: iter([]))  # nothing to parse: fast
    _use_cache(monkeypatch, tmp_path)
    assert data.load_split("train") == []
    assert json.loads(path.read_text())["splits"] == {s: [] for s in data.SPLITS}


def test_unknown_split():
    with pytest.raises(UserError, match="unknown data split 'test'"):
        data.load_split("test")
    with pytest.raises(UserError, match="choose from train, calib, eval"):
        data.split_titles("validation")


def test_missing_gensim_says_how_to_install(tmp_path, monkeypatch):
    _use_cache(monkeypatch, tmp_path)  # empty cache: the dump is needed
    monkeypatch.setattr(data.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UserError, match=r"pip install 'tokenskip\[data\]'"):
        data.load_split("eval")


def test_clean_wikitext_drops_markup_and_boilerplate():
    wiki = ("{{Infobox thing|name=X}}'''Aardvark''' is a [[mammal|burrowing mammal]] "
            "([[File:A.jpg|thumb|upright|A [[cat]]]]) native to Africa.<ref>Book, p. 3</ref> It eats ants "
            "and termites at night.\n\n== History ==\nThe name comes from Afrikaans &amp; means earth pig, "
            "as noted by early settlers.\n{| class=wikitable\n|-\n| a || b\n|}\n"
            "== References ==\n* Some book, 1999, a long citation line that is not prose.\n"
            "[[Category:Mammals]] [[fr:Oryctérope]]")
    text = data.clean_wikitext(wiki)
    assert text == ("Aardvark is a burrowing mammal native to Africa. It eats ants and termites at night."
                    "\n\nThe name comes from Afrikaans & means earth pig, as noted by early settlers.")


# --- read_text_file ----------------------------------------------------------------------------

def test_read_text_file_ok(tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("héllo\n\nworld\n", encoding="utf-8")
    assert data.read_text_file(f) == "héllo\n\nworld\n"
    assert data.read_text_file(str(f)) == "héllo\n\nworld\n"


@pytest.mark.parametrize("case", ["missing", "empty", "whitespace", "non_utf8", "directory"])
def test_read_text_file_errors_name_the_file(tmp_path, case):
    path = tmp_path / f"{case}.txt"
    if case == "empty":
        path.write_bytes(b"")
    elif case == "whitespace":
        path.write_text(" \n\t\n")
    elif case == "non_utf8":
        path.write_bytes(b"\xff\xfe\xfa")
    elif case == "directory":
        path.mkdir()
    with pytest.raises(UserError) as info:
        data.read_text_file(path)
    message = info.value.format_message()
    assert str(path) in message and "\n" not in message


# --- token_windows -----------------------------------------------------------------------------

class FakeTokenizer:
    """One token per character (ids 10..), with configurable BOS / EOS like an HF tokenizer."""

    def __init__(self, bos_token_id=1, eos_token_id=2):
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id

    def encode(self, text, add_special_tokens=True):
        assert add_special_tokens is False
        return [10 + ord(c) % 90 for c in text]


def _ids(text):
    return FakeTokenizer().encode(text, add_special_tokens=False)


def test_windows_start_with_bos_and_follow_the_stream():
    tok = FakeTokenizer()
    texts = ["abcdefghij", "klmnopq"]  # 10 + EOS + 7 = 18 text tokens
    w = windows.token_windows(tok, texts, window=5)
    stream = _ids(texts[0]) + [2] + _ids(texts[1])
    assert w.dtype == torch.long and w.shape == (4, 5)  # 18 // 4 = 4 windows, tail of 2 dropped
    assert (w[:, 0] == 1).all()
    assert w[:, 1:].reshape(-1).tolist() == stream[:16]
    assert (w == 2).sum() == 1  # exactly one EOS, between the texts, never doubled as BOS


def test_windows_without_distinct_bos():
    stream = _ids("abcdefghij") + [2] + _ids("klmnopq")
    for tok in (FakeTokenizer(bos_token_id=None), FakeTokenizer(bos_token_id=2, eos_token_id=2)):
        w = windows.token_windows(tok, ["abcdefghij", "klmnopq"], window=6)
        assert w.shape == (3, 6)
        assert w.reshape(-1).tolist() == stream[:18]


def test_windows_max_windows_stride_and_determinism():
    tok = FakeTokenizer()
    texts = ["the quick brown fox jumps over the lazy dog"] * 5
    full = windows.token_windows(tok, texts, window=16)
    first = windows.token_windows(tok, texts, window=16, max_windows=3)
    assert torch.equal(first, full[:3])
    assert torch.equal(full, windows.token_windows(tok, texts, window=16))
    over = windows.token_windows(tok, texts, window=16, stride=8)  # half-overlapping windows
    assert over.shape[0] > full.shape[0]
    assert over[1, 1:9].tolist() == over[0, 8:16].tolist()  # BOS + 15 text tokens, step 7
    assert torch.equal(over[0], full[0])


def test_windows_too_little_text():
    with pytest.raises(UserError, match=r"text has 3 tokens, need at least 7 for one window of 8.*--seq-len"):
        windows.token_windows(FakeTokenizer(), ["abc"], window=8)
    with pytest.raises(UserError):
        windows.token_windows(FakeTokenizer(), ["abcdef"], window=1)


# --- sampled windows (evaluation, calibration, training) ---------------------------------------

def _articles(n=6, words=40):
    return [" ".join(f"{chr(97 + i)}{j}" for j in range(words)) for i in range(n)]


def test_sample_windows_cover_every_article_without_overlap():
    tok = FakeTokenizer()
    texts = _articles()
    ids, owner = windows.sample_windows(tok, texts, 17, 12, seed=0)
    assert ids.shape == (12, 17) and (ids[:, 0] == 1).all()
    assert set(owner) == set(range(len(texts)))  # round-robin: every article before any repeats
    assert sorted(owner[:6]) == list(range(6))
    stream = []
    for i, t in enumerate(texts):
        stream += ([2] if i else []) + _ids(t)
    spans = []
    for row in ids[:, 1:].tolist():  # locate each window in the stream: disjoint, contiguous
        start = next(s for s in range(len(stream)) if stream[s:s + 16] == row)
        spans.append((start, start + 16))
    spans.sort()
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))


def test_sample_windows_seeded():
    tok, texts = FakeTokenizer(), _articles()
    a, _ = windows.sample_windows(tok, texts, 17, 8, seed=0)
    assert torch.equal(a, windows.sample_windows(tok, texts, 17, 8, seed=0)[0])
    assert not torch.equal(a, windows.sample_windows(tok, texts, 17, 8, seed=1)[0])


def test_sample_windows_short_texts_are_packed_and_count_is_capped():
    tok = FakeTokenizer()
    texts = ["ab cd"] * 40  # 5 tokens each: several texts per window
    ids, owner = windows.sample_windows(tok, texts, 17, 1000, seed=0)
    assert 0 < ids.shape[0] <= (40 * 6 - 1) // 16 and len(set(owner)) == ids.shape[0]
    with pytest.raises(UserError, match="need at least"):
        windows.sample_windows(tok, ["abc"], 17, 2)


def test_news_domain_is_separate_held_out_text(built):
    _, splits = built
    news = data.load_news()
    assert len(news) >= 300 and all(d.strip() == d and d for d in news)
    wiki = set(t for _, texts in splits.values() for t in texts)
    assert not wiki & set(news)
