"""Long-prompt tasks whose evidence can sit anywhere in the prompt (benchmarks.md, "Long prompts").

Continuation KL on running text rewards recency; these tasks put what the answer needs at a
stated depth of a 512-2048-token prompt and ask for it at the end:

- needle: a planted fact (four templates, varied question wordings) in held-out filler text;
- kv_lookup: many random key -> 4-digit value pairs in one of three formats, one key asked;
- article_qa: natural evidence: a sentence of a held-out article (or news story) holding a number
  or a name; the question quotes the sentence up to that word and asks for the next words.

Text comes from held-out data only: the Wikipedia `eval` split and the Lee news corpus (never the
train or calibration splits). Prompts are built in token ids from pieces tokenised separately, so
the evidence's token span (and so its depth) is known exactly, and each example is checked: the
answer's tokens occur in the prompt only inside the evidence span (no leak before or after it).
Everything is deterministic under a seed (random.Random seeded by a string, stable across runs).
"""

from __future__ import annotations

import random
import re
from dataclasses import asdict, dataclass

from tokenskip.errors import UserError

TASKS = ("needle", "kv_lookup", "article_qa")
MAX_TRIES = 50
MIN_LENGTH = 256  # the shortest prompt the generators fill with evidence, filler and a question

_CITIES = ["Berlin", "Lisbon", "Nairobi", "Osaka", "Denver", "Lima", "Oslo", "Cairo", "Perth", "Quebec",
           "Madrid", "Hanoi", "Dublin", "Zurich", "Seoul", "Austin"]
_NAMES = ["Alice", "Marcus", "Priya", "Tomas", "Ingrid", "Kwame", "Sofia", "Hiroshi", "Leila", "Owen",
          "Nadia", "Felix", "Greta", "Rafael", "Yusuf", "Clara"]
_COLOURS = ["crimson", "turquoise", "violet", "amber", "magenta", "teal", "scarlet", "indigo", "ochre",
            "lavender", "maroon", "beige"]
_PLACES = ["blue teapot", "garden shed", "piano bench", "red suitcase", "attic trunk", "wooden chest",
           "kitchen drawer", "old boot", "flower pot", "library desk"]
_ADJ = ["silver", "brass", "golden", "iron", "copper", "crystal", "bronze", "rusty"]

# (fact, question lines, answer prefix, answer): {c} city, {n} name, {num} number, {col} colour,
# {adj} adjective, {pl} place, {yr} year. The answer prefix repeats the fact's start, so a model
# that found the fact answers by copying it.
_NEEDLES = [
    ("The secret code of the {c} office is {num}.",
     ["What is the secret code of the {c} office?", "Which code does the {c} office use?"],
     "The secret code of the {c} office is", " {num}"),
    ("{n}'s favourite colour is {col}.",
     ["What is {n}'s favourite colour?", "Which colour does {n} like best?"],
     "{n}'s favourite colour is", " {col}"),
    ("The {adj} key is hidden in the {pl}.",
     ["Where is the {adj} key hidden?", "In which place can the {adj} key be found?"],
     "The {adj} key is hidden in the", " {pl}"),
    ("{n} from {c} was born in the year {yr}.",
     ["In which year was {n} from {c} born?", "When was {n} from {c} born?"],
     "{n} from {c} was born in the year", " {yr}"),
]
_FRAMES = ["\n\nQuestion: {q}\nAnswer: {a}", "\n\nQ: {q}\nA: {a}",
           "\n\nBased on the text above, answer the question. {q}\n{a}"]

# kv_lookup formats: (header, pair, question + answer prefix); {k} key, {v} value
_KV_FORMATS = [
    ("Here is a list of keys and their values.\n", "{k}: {v}\n", "\nWhat is the value of {k}?\n{k}:"),
    ("Records (JSON):\n{{\n", '  "{k}": {v},\n', '}}\n\nLook up "{k}" in the JSON above.\n"{k}":'),
    ("Read the following facts.\n", "The value of {k} is {v}. ",
     "\n\nQuestion: what is the value of {k}?\nAnswer: The value of {k} is"),
]
_QA_FRAMES = ['\n\nEarlier the text said: "{p}', '\n\nQuote from the text above: "{p}',
              '\n\nComplete the sentence from the text above: "{p}']
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(])")
_WORD = re.compile(r"^[a-z]{4,9}$")


@dataclass
class LongCtxExample:
    """One long-prompt question: the prompt is routed, the answer scored through the KV cache."""

    task: str
    length: int  # nominal prompt length (tokens)
    prompt: list[int]  # token ids (the answer is never part of them)
    answer: list[int]  # token ids a greedy decoder must reproduce exactly
    evidence: tuple[int, int]  # [start, end) token span of the evidence in the prompt
    depth: float  # evidence start / len(prompt), in [0, 1)
    source: str  # filler / article source: wiki | news | pairs

    def to_json(self) -> dict:
        return asdict(self)


def find_sub(seq: list[int], sub: list[int]) -> list[int]:
    """Start indexes of every occurrence of `sub` in `seq`."""
    n = len(sub)
    return [i for i in range(len(seq) - n + 1) if seq[i:i + n] == sub]


def leaks(prompt: list[int], answer: list[int], evidence: tuple[int, int]) -> bool:
    """Whether the answer's tokens occur in the prompt anywhere but inside the evidence span."""
    return any(not (evidence[0] <= i and i + len(answer) <= evidence[1]) for i in find_sub(prompt, answer))


class Corpus:
    """Held-out text as sentences, each tokenised once (with its leading space)."""

    def __init__(self, tokenizer, docs: list[str], name: str) -> None:
        self.name = name
        self.sentences: list[str] = []
        self.doc_start: list[int] = []  # sentence index where each document starts
        for doc in docs:
            self.doc_start.append(len(self.sentences))
            for para in doc.split("\n"):
                self.sentences += [s.strip() for s in _SENTENCE_END.split(para) if s.strip()]
        enc = tokenizer([" " + s for s in self.sentences], add_special_tokens=False)["input_ids"]
        self.ids: list[list[int]] = [list(x) for x in enc]

    def stream(self, rng: random.Random, n_tokens: int) -> tuple[list[int], list[int]]:
        """Consecutive sentences from a random document start, wrapping around: (sentence indexes,
        token offsets of each sentence start), covering at least n_tokens tokens."""
        i = rng.choice(self.doc_start)
        idx, offs, total = [], [], 0
        while total < n_tokens:
            idx.append(i)
            offs.append(total)
            total += len(self.ids[i])
            i = (i + 1) % len(self.ids)
        return idx, offs


def _flat(corpus: Corpus, idx: list[int]) -> list[int]:
    return [t for i in idx for t in corpus.ids[i]]


def _depths(rng: random.Random, n: int) -> list[float]:
    """Stratified depths: one per equal slice of [0, 1], shuffled (every depth bin gets examples)."""
    d = [(i + rng.random()) / n for i in range(n)]
    rng.shuffle(d)
    return d


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _needle(tokenizer, corpus: Corpus, rng: random.Random, length: int, depth: float) -> LongCtxExample | None:
    fact, questions, prefix, answer = rng.choice(_NEEDLES)
    slots = dict(c=rng.choice(_CITIES), n=rng.choice(_NAMES), num=str(rng.randint(1000, 9999)),
                 col=rng.choice(_COLOURS), adj=rng.choice(_ADJ), pl=rng.choice(_PLACES),
                 yr=str(rng.randint(1500, 1990)))
    ev = _encode(tokenizer, " " + fact.format(**slots))
    frame, question = rng.choice(_FRAMES), rng.choice(questions)
    q = _encode(tokenizer, frame.format(q=question.format(**slots), a=prefix.format(**slots)))
    ans = _encode(tokenizer, answer.format(**slots))
    budget = length - len(ev) - len(q)  # filler tokens
    idx, offs = corpus.stream(rng, budget)
    # insert at the sentence boundary nearest the target depth
    cut = min(offs + [budget], key=lambda o: abs(o - depth * budget))
    filler = _flat(corpus, idx)[:budget]
    prompt = filler[:cut] + ev + filler[cut:] + q
    return _example("needle", length, prompt, ans, (cut, cut + len(ev)), corpus.name)


def _kv_lookup(tokenizer, vocab: list[str], rng: random.Random, length: int, depth: float) -> LongCtxExample | None:
    header, pair, question = rng.choice(_KV_FORMATS)
    head = _encode(tokenizer, header.format())
    keys: list[str] = []
    seen: set[str] = set()
    values = rng.sample(range(1000, 10000), 2 * length // 8)  # unique values, more than ever fit
    pairs: list[list[int]] = []
    used = len(head)
    reserve = len(_encode(tokenizer, question.format(k="wwww-wwww"))) + 16  # the question is added last
    while True:
        k = f"{rng.choice(vocab)}-{rng.choice(vocab)}"
        if k in seen:
            continue
        ids = _encode(tokenizer, pair.format(k=k, v=values[len(pairs)]))
        if used + len(ids) + reserve > length or len(pairs) == len(values):
            break
        seen.add(k)
        keys.append(k)
        pairs.append(ids)
        used += len(ids)
    starts, pos = [], len(head)
    for p in pairs:
        starts.append(pos)
        pos += len(p)
    j = min(range(len(pairs)), key=lambda i: abs(starts[i] - depth * pos))
    q = _encode(tokenizer, question.format(k=keys[j]))
    ans = _encode(tokenizer, f" {values[j]}")
    prompt = head + [t for p in pairs for t in p] + q
    return _example("kv_lookup", length, prompt, ans, (starts[j], starts[j] + len(pairs[j])), "pairs")


def _split_point(words: list[str]) -> int | None:
    """Index of the first distinctive word (holds a digit, or a capitalised name) after the fifth."""
    for j in range(5, len(words)):
        w = words[j].strip(".,;:!?\"'()")
        if w and (any(ch.isdigit() for ch in w) or (w[0].isupper() and w.isalpha())):
            return j
    return None


def _article_qa(tokenizer, corpus: Corpus, rng: random.Random, length: int, depth: float) -> LongCtxExample | None:
    frame = rng.choice(_QA_FRAMES)
    idx, offs = corpus.stream(rng, length)
    order = sorted(range(len(idx)), key=lambda i: abs(offs[i] - depth * length))
    for e in order[:12]:  # the sentences nearest the target depth
        sent = corpus.sentences[idx[e]]
        words = sent.split()
        j = _split_point(words)
        if j is None or j > 24 or len(words) < 8:
            continue
        # the distinctive word and the next one, unless punctuation ends the phrase at the first
        take = words[j:j + 1] if words[j][-1] in ".,;:!?)" else words[j:j + 2]
        answer = " " + " ".join(take).rstrip(".,;:!?\"')")
        q = _encode(tokenizer, frame.format(p=" ".join(words[:j])))
        span = (offs[e], offs[e] + len(corpus.ids[idx[e]]))
        if span[1] > length - len(q):  # the sentence must fit before the question
            continue
        ans = _encode(tokenizer, answer)
        filler = _flat(corpus, idx)[:length - len(q)]
        ex = _example("article_qa", length, filler + q, ans, span, corpus.name)
        if ex is not None and find_sub(filler[span[0]:span[1]], ans):  # the sentence holds the answer as tokenised
            return ex
    return None


def _example(task, length, prompt, ans, span, source) -> LongCtxExample | None:
    if leaks(prompt, ans, span):
        return None
    return LongCtxExample(task=task, length=length, prompt=prompt, answer=ans, evidence=span,
                          depth=span[0] / len(prompt), source=source)


def _vocab(docs: list[str]) -> list[str]:
    """Lower-case words of held-out text, 4-9 letters: the kv keys' parts (sorted: deterministic)."""
    return sorted({w for d in docs for w in re.findall(r"[A-Za-z]+", d) if _WORD.match(w)})


def check_tasks(tasks, flag: str = "--tasks") -> None:
    bad = [t for t in tasks if t not in TASKS]
    if bad or not tasks:
        raise UserError(f"{flag} {','.join(bad) or '(empty)'}: choose from {', '.join(TASKS)}")


def check_lengths(lengths, flag: str = "--lengths", max_len: int | None = None) -> None:
    """Prompt lengths in [MIN_LENGTH, max_len] (max_len: the model's context; None before the model
    is loaded)."""
    if not lengths:
        raise UserError(f"{flag}: give at least one length")
    for length in lengths:
        if length < MIN_LENGTH:
            raise UserError(f"{flag} {length}: must be >= {MIN_LENGTH} tokens")
        if max_len is not None and length > max_len:
            raise UserError(f"{flag} {length}: longer than the model's context ({max_len} tokens)")


def check_request(tasks, lengths, n: int, max_len: int | None = None,
                  flags: tuple[str, str, str] = ("--tasks", "--lengths", "--examples")) -> None:
    """One line naming the flag at fault (`flags`: the command's names for tasks, lengths and
    examples): an unknown task, a length out of range, fewer than one example."""
    check_tasks(tasks, flags[0])
    check_lengths(lengths, flags[1], max_len)
    if n < 1:
        raise UserError(f"{flags[2]} {n}: must be >= 1")


def make_examples(tokenizer, tasks: list[str], lengths: list[int], n: int, seed: int = 0,
                  wiki: list[str] | None = None, news: list[str] | None = None) -> list[LongCtxExample]:
    """n examples per (task, length), deterministic under `seed`. Filler and articles alternate
    between the Wikipedia eval split and the news corpus (held-out data: `wiki`/`news` default to
    tokenskip.data's, and tests pass their own text)."""
    if wiki is None or news is None:
        from tokenskip.data import load_news, load_split

        wiki = load_split("eval") if wiki is None else wiki
        news = load_news() if news is None else news
    first = Corpus(tokenizer, wiki, "wiki")
    corpora = [first, first if news is wiki else Corpus(tokenizer, news, "news")]  # one text: tokenised once
    vocab = _vocab(wiki)
    out: list[LongCtxExample] = []
    for task in tasks:
        for length in lengths:
            rng = random.Random(f"tokenskip-longctx-{seed}-{task}-{length}")
            for i, depth in enumerate(_depths(rng, n)):
                for _ in range(MAX_TRIES):
                    if task == "kv_lookup":
                        ex = _kv_lookup(tokenizer, vocab, rng, length, depth)
                    elif task == "needle":
                        ex = _needle(tokenizer, corpora[i % 2], rng, length, depth)
                    else:
                        ex = _article_qa(tokenizer, corpora[i % 2], rng, length, depth)
                    if ex is not None:
                        out.append(ex)
                        break
                else:
                    raise RuntimeError(f"{task} at {length} tokens: no leak-free example in {MAX_TRIES} tries")
    return out
