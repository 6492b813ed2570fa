"""Multiple-choice accuracy retention on BIG-bench JSON tasks, offline.

The tasks come from the `bigbench==1.0.0` sdist on PyPI (it holds every task.json; installing the
package would drag in TensorFlow, so we never install it). We fetch the sdist once with
`pip download --no-deps --no-binary :all:`, read `bigbench/benchmark_tasks/<task>/task.json`
straight out of the tarball and cache those files under `cache_dir()/bigbench/`.

Scoring (the choices are the continuation), exactly as deployment computes it: a prompt is the
task prefix, the example's input and the output prefix (BIG-bench's defaults "\\nQ: " / "\\nA:"). It
is routed ONCE by prefill; every choice is then decoded teacher-forced through that KV cache and
scored by the summed log-probability of its tokens. So a choice never changes the routing of the
shared prompt. The prediction is the highest-scoring choice; it is right when its target score is
the example's maximum. Chance is the mean over examples of (#right choices / #choices). Accuracy
and retention carry paired bootstrap 95% CIs over examples.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from tokenskip.errors import UserError
from tokenskip.fileio import cache_dir, sha256_file, write_json_atomic
from tokenskip.precision import model_device

SDIST = "bigbench-1.0.0.tar.gz"
REQUIREMENT = "bigbench==1.0.0"
SHA256 = "1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2"
MEMBER = "bigbench-1.0.0/bigbench/benchmark_tasks/{task}/task.json"

# Where smollm2-135m (dense) is clearly above chance in our survey (docs/training.md).
DEFAULT_TASKS = ("general_knowledge", "human_organs_senses", "emoji_movie")
MAX_PROMPT_TOKENS = 384


def _pip_download(python: str, dest: str) -> subprocess.CompletedProcess:
    cmd = [python, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-q", "-d", dest, REQUIREMENT]
    return subprocess.run(cmd, capture_output=True, text=True)


def sdist_path() -> Path:
    """The BIG-bench sdist from the cache, else from PyPI.

    pip >= 25 refuses this sdist after building its metadata (it declares a direct-URL dependency,
    bleurt); pip 24.2 in a throwaway virtual environment downloads it fine, so we fall back to that.
    """
    dl_dir = cache_dir() / "downloads"
    path = dl_dir / SDIST
    if path.is_file() and sha256_file(path) == SHA256:
        return path
    dl_dir.mkdir(parents=True, exist_ok=True)
    print(f"tokenskip: downloading {REQUIREMENT} (sdist, 358 MB, once; cached in {dl_dir})", file=sys.stderr)
    with tempfile.TemporaryDirectory(dir=dl_dir) as tmp:
        proc = _pip_download(sys.executable, tmp)
        got = Path(tmp) / SDIST
        if not got.is_file() and "direct URL" in (proc.stderr + proc.stdout):
            venv = Path(tmp) / "oldpip"
            subprocess.run([sys.executable, "-m", "venv", str(venv)], capture_output=True, check=False)
            py = str(venv / "bin" / "python")
            subprocess.run([py, "-m", "pip", "install", "-q", "pip==24.2"], capture_output=True, check=False)
            proc = _pip_download(py, tmp)
        if not got.is_file():
            last = ((proc.stderr or proc.stdout).strip().splitlines() or ["no output"])[-1]
            raise UserError(f"--tasks: could not download {REQUIREMENT} from PyPI: {last}")
        digest = sha256_file(got)
        if digest != SHA256:
            raise UserError(f"{SDIST} has sha256 {digest}, expected {SHA256}: refusing to use it")
        os.replace(got, path)
    return path


def task_files(tasks: list[str]) -> dict[str, Path]:
    """task name (or task/subtask) -> cached task.json, extracting what is missing in one pass."""
    root = cache_dir() / "bigbench"
    want = {t: root / t / "task.json" for t in tasks}
    missing = {MEMBER.format(task=t): t for t, p in want.items() if not p.is_file()}
    if missing:
        with tarfile.open(sdist_path()) as tf:
            for member in tf:
                t = missing.pop(member.name, None)
                if t is None:
                    continue
                data = tf.extractfile(member).read()
                want[t].parent.mkdir(parents=True, exist_ok=True)
                write_json_atomic(want[t], json.loads(data.decode("utf-8")))
                if not missing:
                    break
        if missing:
            raise UserError(f"--tasks: no BIG-bench JSON task named {', '.join(sorted(missing.values()))} "
                            "(use a folder name under bigbench/benchmark_tasks, e.g. hyperbaton or "
                            "logical_deduction/three_objects)")
    return want


@dataclass
class MCExample:
    prompt: str
    choices: list[str]
    correct: list[bool]


def load_task(name: str, path: Path, max_examples: int, seed: int = 0) -> list[MCExample]:
    task = json.loads(path.read_text(encoding="utf-8"))
    raw = [e for e in task.get("examples", []) if isinstance(e.get("target_scores"), dict) and e["target_scores"]]
    if not raw:
        subs = task.get("subtasks")
        hint = f" (it has subtasks: use {name}/<subtask>)" if subs else ""
        raise UserError(f"--tasks {name}: not a multiple-choice JSON task{hint}")
    if len(raw) > max_examples:
        raw = random.Random(seed).sample(raw, max_examples)
    prefix = task.get("task_prefix", "")
    q = task.get("example_input_prefix", "\nQ: ")
    a = task.get("example_output_prefix", "\nA: ").rstrip(" ")
    out = []
    for e in raw:
        choices = list(e["target_scores"])
        best = max(float(v) for v in e["target_scores"].values())
        out.append(MCExample(prompt=f"{prefix}{q}{e['input']}{a}".lstrip("\n"), choices=choices,
                             correct=[float(e["target_scores"][c]) == best for c in choices]))
    return out


@dataclass
class TaskResult:
    task: str
    accuracy: float
    chance: float
    examples: int
    correct: list[int] | None = None  # per example 0/1 (the bootstrap's unit)
    accuracy_ci: list[float] | None = None

    def to_json(self) -> dict:
        return asdict(self)


@torch.no_grad()
def choice_logprobs(routed, tokenizer, ex: MCExample) -> list[float]:
    """Summed log-prob of each choice's tokens after the prompt: one routed prefill of the prompt,
    then each choice decoded teacher-forced through its cache (choices of equal length batched)."""
    from tokenskip.block import LayerKV

    p_ids = tokenizer(ex.prompt, add_special_tokens=True)["input_ids"][-MAX_PROMPT_TOKENS:]
    c_ids = [tokenizer(" " + c.strip(), add_special_tokens=False)["input_ids"] or [tokenizer.eos_token_id]
             for c in ex.choices]
    device = model_device(routed.model)
    prompt = torch.tensor([p_ids], dtype=torch.long, device=device)  # [1,P]
    first, cache = routed.prefill(prompt)  # [1,V] predicts each choice's first token
    first_lp = F.log_softmax(first.float(), -1)[0]  # [V]
    scores = [0.0] * len(c_ids)
    by_len: dict[int, list[int]] = {}
    for i, c in enumerate(c_ids):
        by_len.setdefault(len(c), []).append(i)
    for t, idx in by_len.items():
        toks = torch.tensor([c_ids[i] for i in idx], dtype=torch.long, device=device)  # [b,t]
        s = first_lp[toks[:, 0]]  # [b]
        if t > 1:
            b = len(idx)
            rows = [None if kv is None else LayerKV(kv.key.expand(b, -1, -1, -1), kv.value.expand(b, -1, -1, -1),
                                                    kv.pos.expand(b, -1), kv.valid.expand(b, -1)) for kv in cache]
            pos = torch.arange(len(p_ids), len(p_ids) + t - 1, device=device).expand(b, -1)  # [b,t-1]
            logits, _ = routed.decode_step(toks[:, :-1], pos, rows, all_logits=True)  # [b,t-1,V]
            lp = F.log_softmax(logits.float(), -1)
            s = s + lp.gather(-1, toks[:, 1:].unsqueeze(-1)).squeeze(-1).sum(-1)
        for j, i in enumerate(idx):
            scores[i] = float(s[j])
    return scores


def mc_accuracy(routed, tokenizer, name: str, examples: list[MCExample], seed: int = 0) -> TaskResult:
    from tokenskip import stats

    correct, chance = [], 0.0
    for ex in examples:
        scores = choice_logprobs(routed, tokenizer, ex)
        pred = max(range(len(scores)), key=lambda i: (scores[i], -i))
        correct.append(int(ex.correct[pred]))
        chance += sum(ex.correct) / len(ex.correct)
    n = len(examples)
    return TaskResult(task=name, accuracy=sum(correct) / n, chance=chance / n, examples=n, correct=correct,
                      accuracy_ci=list(stats.proportion_ci(correct, seed=seed)))


def retention(method: list[dict], dense: list[dict], seed: int = 0) -> tuple[float, float, list[float] | None]:
    """(mean accuracy, mean over tasks of acc / dense acc, its paired bootstrap 95% CI) for the task
    results of one method. The bootstrap resamples each task's examples, the same draws for the
    method and dense."""
    import numpy as np

    from tokenskip import stats

    d = {t["task"]: t for t in dense}
    pairs = [(t, d[t["task"]]) for t in method if d.get(t["task"]) and d[t["task"]]["accuracy"] > 0]
    if not pairs:
        return float("nan"), float("nan"), None
    acc = sum(m["accuracy"] for m, _ in pairs) / len(pairs)
    ret = sum(m["accuracy"] / r["accuracy"] for m, r in pairs) / len(pairs)
    if not all(m.get("correct") and r.get("correct") for m, r in pairs):
        return acc, ret, None
    per_task = []
    for k, (m, r) in enumerate(pairs):
        idx = stats.resample_indices(len(m["correct"]), seed=seed + k)
        a, b = np.asarray(m["correct"], float)[idx].mean(1), np.asarray(r["correct"], float)[idx].mean(1)
        per_task.append(a / np.maximum(b, 1e-12))
    return acc, ret, list(stats.percentile_ci(np.mean(per_task, axis=0)))


def attach_retention(rows: list[dict], tasks: dict, seed: int = 0) -> None:
    """Add mc_acc / mc_retention / mc_retention_ci to table rows from {method: [TaskResult json]}."""
    dense = tasks.get("dense")
    for row in rows:
        mt = tasks.get(row["method"])
        if mt and dense:
            row["mc_acc"], row["mc_retention"], row["mc_retention_ci"] = retention(mt, dense, seed)


def format_tasks(tasks: dict) -> str:
    """Multiple-choice accuracy per task and method (95% CI), chance, and retention vs dense."""
    dense = {t["task"]: t["accuracy"] for t in tasks.get("dense", [])}
    rows = ["| method | task | n | accuracy [95% CI] | chance | retention |", "|---|---|---|---|---|---|"]
    for method, results in tasks.items():
        for t in results:
            ret = t["accuracy"] / dense[t["task"]] if dense.get(t["task"]) else float("nan")
            ci = t.get("accuracy_ci")
            acc = f"{t['accuracy']:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")
            rows.append(f"| {method} | {t['task']} | {t['examples']} | {acc} | {t['chance']:.3f} | {ret:.3f} |")
    return "\n".join(rows)


def parse_tasks(value: str) -> list[str]:
    if value.strip() == "default":
        return list(DEFAULT_TASKS)
    names = [t.strip() for t in value.split(",") if t.strip()]
    if not names:
        raise UserError("--tasks: give comma-separated BIG-bench task names, or `default`")
    for t in names:
        if not all(ch.isalnum() or ch in "_/" for ch in t) or t.startswith("/") or ".." in t:
            raise UserError(f"--tasks {t}: not a task name (letters, digits, _ and / only)")
    return names


def load_tasks(names: list[str], max_examples: int, seed: int = 0) -> dict[str, list[MCExample]]:
    files = task_files(names)
    return {t: load_task(t, files[t], max_examples, seed) for t in names}


def run_tasks(routed, tokenizer, tasks: dict[str, list[MCExample]], progress: bool = True, seed: int = 0
              ) -> list[TaskResult]:
    """Accuracy of `routed` (router None = dense) on every task, scored as deployment runs."""
    from tqdm.auto import tqdm

    return [mc_accuracy(routed, tokenizer, name, exs, seed)
            for name, exs in tqdm(tasks.items(), desc="tasks", disable=not progress, leave=False)]
