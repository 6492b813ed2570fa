"""lm-evaluation-harness scoring through a live `tokenskip serve` (its `local-completions` model:
`echo`, `logprobs: 1`, `max_tokens: 1`), offline, on a local multiple-choice task written here.

What must hold: every loglikelihood lm-eval received equals the one computed in this process from
the same backend the server builds (its ServeSpec, `--write-spec`) by one full-sequence forward of
the routed model, which is how the server scores a prompt (deploy/serve/logprobs.py); the is_greedy
flags and the accuracy lm-eval reports equal the ones computed from those values. Dense: they also
equal the Hugging Face model's. Routed: they differ from the dense ones, so the routing was applied.

The tiny model's char tokenizer encodes text losslessly, so lm-eval's two request forms (token ids,
and text the server tokenizes again) must give the same ids; each is run once. lm-eval comes from
the `clients` extra (tokenskip.deploy.serve.external.client_python); without it the test skips.
"""

from __future__ import annotations

import json
import os
import subprocess

import pytest
import torch
from click.testing import CliRunner

pytest.importorskip("fastapi")

from tokenskip.deploy.serve.external import OFFLINE, client_python, missing_client  # noqa: E402
from tokenskip.deploy.serve.runner import ServerProcess  # noqa: E402

from conftest import metric_samples  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

QUESTIONS = [  # ASCII only: the char tokenizer knows it, and lm-eval's text requests round-trip
    ("The capital of France is", ["Paris", "London", "Berlin"], 0),
    ("Two plus two equals", ["four", "seven", "banana"], 0),
    ("The sun rises in the", ["west", "east", "ocean"], 1),
    ("Water freezes at zero degrees", ["Celsius", "Kelvin"], 0),
    ("A cat is a kind of", ["vehicle", "animal", "planet"], 1),
    ("Snow is usually", ["green", "white"], 1),
]
ROUTERS = {"dense": ["--router", "dense"], "routed": ["--router", "static", "--sparsity", "0.5"]}


@pytest.fixture(scope="module")
def lm_eval_python():
    python = client_python("lm_eval")
    if python is None:
        print(f"SKIP REASON: {missing_client('lm_eval')}")
        pytest.skip(missing_client("lm_eval"))
    return python


def write_task(folder) -> None:
    """A local lm-eval task: `dataset_path: json`, one test split, multiple choice, accuracy."""
    data = folder / "data.jsonl"
    data.write_text("".join(json.dumps({"question": q, "choices": c, "label": y}) + "\n" for q, c, y in QUESTIONS))
    (folder / "tiny_mc.yaml").write_text(
        f"task: tiny_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
        "output_type: multiple_choice\ndoc_to_text: \"{{question}}\"\ndoc_to_choice: \"{{choices}}\"\n"
        "doc_to_target: \"{{label}}\"\nmetric_list:\n  - metric: acc\n    aggregation: mean\n"
        "    higher_is_better: true\n")


def run_lm_eval(python: str, url: str, tokenizer, tmp_path, tokenized: bool) -> tuple[dict, list[dict]]:
    """`lm_eval run --model local-completions` against url, offline -> (results, samples by doc_id)."""
    task, out = tmp_path / "task", tmp_path / "out"
    task.mkdir()
    write_task(task)
    args = (f"base_url={url}/v1/completions,model=tiny,tokenizer={tokenizer},tokenizer_backend=huggingface,"
            f"tokenized_requests={tokenized},max_retries=1")
    env = {**os.environ, **OFFLINE, "HF_HOME": str(tmp_path / "hf"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([python, "-m", "lm_eval", "run", "--model", "local-completions", "--model_args", args,
                           "--tasks", "tiny_mc", "--include_path", str(task), "--output_path", str(out),
                           "--log_samples", "--batch_size", "1"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    (results,) = [json.loads(p.read_text()) for p in out.rglob("results_*.json")]
    (samples_file,) = out.rglob("samples_tiny_mc_*.jsonl")
    samples = sorted((json.loads(line) for line in samples_file.read_text().splitlines()), key=lambda s: s["doc_id"])
    return results, samples


def reference_backend(folder, flags: list[str], tmp_path):
    """The backend the server builds for these flags, built here from the same ServeSpec."""
    from tokenskip.deploy.runtime.base import create_backend
    from tokenskip.deploy.serve.cli import serve
    from tokenskip.deploy.serve.launch import ServeSpec

    spec_file = tmp_path / "spec.json"
    res = CliRunner().invoke(serve, ["--model", str(folder), *flags, "--threads", "1", "--write-spec", str(spec_file)])
    assert res.exit_code == 0, res.output
    backend, tokenizer, _ = create_backend(ServeSpec(**json.loads(spec_file.read_text())).backend_spec())
    return backend, tokenizer


def encode_pair(tok, context: str, continuation: str) -> tuple[list[int], int]:
    """lm-eval's split of a request into ids: trailing spaces of the context move to the
    continuation; the continuation's ids are the whole text's after the context's."""
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    ctx = tok(context, add_special_tokens=False).input_ids
    whole = tok(context + continuation, add_special_tokens=False).input_ids
    return ctx + whole[len(ctx):], len(ctx)


@torch.no_grad()
def loglikelihood(logits_of, ids: list[int], ctxlen: int) -> tuple[float, bool]:
    """(sum of the continuation's log-probs, whether each continuation token was the argmax)."""
    x = torch.tensor([ids])  # [1,S]
    lp = torch.log_softmax(logits_of(x)[0, :-1].float(), dim=-1)  # [S-1,V]: row i predicts token i+1
    cont = torch.tensor(ids[ctxlen:])  # [C]
    rows = lp[ctxlen - 1:]  # [C,V]
    return float(rows.gather(1, cont[:, None]).sum()), bool((rows.argmax(-1) == cont).all())


@pytest.mark.parametrize("side,tokenized", [("dense", True), ("routed", False)])
def test_lm_eval_scores_through_the_server_equal_the_model(lm_eval_python, tiny_served, tmp_path, side, tokenized):
    flags = ROUTERS[side]
    with ServerProcess(["--model", str(tiny_served), *flags, "--served-model-name", "tiny", "--threads", "1",
                        "--log-level", "warning"]) as server:
        results, samples = run_lm_eval(lm_eval_python, server.url, tiny_served, tmp_path, tokenized)
        served = metric_samples(server.url)
    n_requests = sum(len(c) for _, c, _ in QUESTIONS)
    assert served[("tokenskip_requests_total", (("endpoint", "/v1/completions"), ("status", "200")))] == n_requests

    backend, tok = reference_backend(tiny_served, flags, tmp_path)
    routed = backend.routed
    hf = routed.model if side == "dense" else None
    assert len(samples) == len(QUESTIONS)
    correct, moved = [], 0.0
    for s, (question, choices, label) in zip(samples, QUESTIONS):
        assert s["doc"]["question"] == question
        got = [(float(ll), flag == "True") for ((ll, flag),) in s["resps"]]
        refs = []
        for i, choice in enumerate(choices):
            args = s["arguments"][f"gen_args_{i}"]
            assert args["arg_1"] == " " + choice  # target_delimiter + choice
            ids, ctxlen = encode_pair(tok, args["arg_0"], args["arg_1"])
            ref = loglikelihood(lambda x: routed(x, torch.ones_like(x), padded=False).logits, ids, ctxlen)
            refs.append(ref)
            assert got[i][0] == pytest.approx(ref[0], abs=1e-4), (question, choice)
            assert got[i][1] == ref[1], (question, choice)
            if hf is not None:  # dense: the Hugging Face model's own log-probs
                assert got[i][0] == pytest.approx(loglikelihood(lambda x: hf(x).logits, ids, ctxlen)[0], abs=1e-4)
            else:  # routed: the routing shows in the scores
                dense_ll = loglikelihood(lambda x: routed.model(x).logits, ids, ctxlen)[0]
                moved = max(moved, abs(got[i][0] - dense_ll))
        pick = max(range(len(refs)), key=lambda i: refs[i][0])
        correct.append(float(pick == label))
        assert s["acc"] == correct[-1], question
    assert results["results"]["tiny_mc"]["acc,none"] == pytest.approx(sum(correct) / len(correct))
    if side == "routed":
        assert moved > 1e-3, "routed scores equal the dense model's: routing was not applied to scoring"
