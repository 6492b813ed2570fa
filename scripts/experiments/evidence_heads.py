"""Issue 20 input screen: which blocks' and heads' attention from the prompt's last rows (the
question) points at the evidence, and can a learned weighting of early blocks' heads find it
before the middle of the model (a selection layer that leaves budget for sparsity 0.4)?

Dense forward (eager attention) of long-prompt examples (seed 1: not the seed-0 evaluation set);
per (block, head): score[t] = max over the last `W` prompt rows of the attention to key t.
Reported per block: recall of evidence tokens in the top 20% of tokens by score (the max over heads,
gemfilter's rule), and for a logistic regression over all heads of blocks < L (fit on half the
examples, scored on the other half).

usage: .venv/bin/python scripts/experiments/evidence_heads.py N [W]
(scikit-learn: installed with the `clients` extra, through lm-eval)
"""
import sys

import numpy as np
import torch

from tokenskip.models import load_model
from tokenskip.train.longctx_tasks import make_examples

torch.set_num_threads(2)
N = int(sys.argv[1])
W = int(sys.argv[2]) if len(sys.argv) > 2 else 16
TOP = 0.2

lm = load_model("smollm2-135m")
model = lm.model
model.config._attn_implementation = "eager"
exs = make_examples(lm.tokenizer, ["needle", "article_qa"], [512], N, seed=1)
feats, labels, groups = [], [], []
with torch.no_grad():
    for gi, ex in enumerate(exs):
        ids = torch.tensor([ex.prompt])
        out = model(ids, output_attentions=True)
        S = ids.shape[1]
        att = torch.stack([a[0] for a in out.attentions])  # [L,H,S,S]
        score = att[:, :, S - W:, :].amax(2)  # [L,H,S] max over the last W rows
        keys = torch.arange(1, S - W)  # candidate keys: not the sink, not the question rows
        f = score[:, :, keys].permute(2, 0, 1).reshape(len(keys), -1)  # [T, L*H]
        y = ((keys >= ex.evidence[0]) & (keys < ex.evidence[1])).float()
        feats.append(f.numpy()); labels.append(y.numpy()); groups.append(np.full(len(keys), gi))
L, H = att.shape[0], att.shape[1]


def recall(score: np.ndarray, y: np.ndarray) -> float:
    k = max(1, int(TOP * len(score)))
    top = np.argsort(-score)[:k]
    return float(y[top].sum() / max(1.0, y.sum()))


def per_example(fn, idx) -> float:
    return float(np.mean([recall(fn(feats[i]), labels[i]) for i in idx]))


every = range(len(exs))
print(f"{len(exs)} examples, W={W}, recall of evidence tokens in the top {TOP:.0%} (chance {TOP:.2f})")
print("block  max-over-heads  best-head(h)")
for l in range(L):
    mx = per_example(lambda f: f[:, l * H:(l + 1) * H].max(1), every)
    heads = [per_example(lambda f, h=h: f[:, l * H + h], every) for h in range(H)]
    print(f"{l:5d}  {mx:.2f}            {max(heads):.2f}({int(np.argmax(heads))})")

# learned: logistic regression over the heads of blocks < cut (log-attention features), 2-fold by example
from sklearn.linear_model import LogisticRegression  # noqa: E402

half = len(exs) // 2
folds = [(list(range(half)), list(range(half, len(exs)))), (list(range(half, len(exs))), list(range(half)))]
print("learned weighting of all heads of blocks < cut (2-fold by example):")
for cut in (4, 6, 8, 10, 12, 15, 20):
    rs = []
    for tr, te in folds:
        X = np.log(np.concatenate([feats[i][:, :cut * H] for i in tr]) + 1e-6)
        y = np.concatenate([labels[i] for i in tr])
        clf = LogisticRegression(max_iter=2000, C=1.0, class_weight="balanced").fit(X, y)
        rs.append(np.mean([recall(clf.decision_function(np.log(feats[i][:, :cut * H] + 1e-6)), labels[i]) for i in te]))
    print(f"  cut {cut:2d}: recall {np.mean(rs):.2f}")
