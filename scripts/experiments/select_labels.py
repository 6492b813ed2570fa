"""Issue 20 screen (docs/training.md 8.9): which labels and which loss make the select router keep
the ANSWERS of long-prompt questions, by evidence depth, on the selection tables alone.

Tables at the selection block (first routed block FIRST, default 8) are computed once for train-split
examples (needle, kv_lookup, article_qa; 24 per task and length) and calib-split validation examples
(needle, article_qa; 32 per task and length), at 512 and 1024 tokens, and cached. For each sparsity,
label (the whole evidence span, or the answer and its lead-in: train/select.answer_span) and loss
(listwise, cut), a SelectRouter is fitted from its start (150 Adam steps, lr 0.05) and scored by
the share of validation examples whose answer span (with its lead-in) the first routed block keeps
whole, by fifths of evidence depth.

usage: .venv/bin/python scripts/experiments/select_labels.py [SPARSITIES] [FIRST]   # e.g. 0.3,0.4 8
"""
import sys
from dataclasses import replace
from pathlib import Path

import torch

from tokenskip.models import load_model
from tokenskip.routed import RoutedModel
from tokenskip.routers import RouteContext, SelectRouter, recent_share
from tokenskip.schedule import Schedule
from tokenskip.selection import block_keep_count, forced_tokens, routing_scores
from tokenskip.train import select as S

torch.set_num_threads(1)
SPARSITIES = [float(x) for x in (sys.argv[1] if len(sys.argv) > 1 else "0.3,0.4").split(",")]
FIRST = int(sys.argv[2]) if len(sys.argv) > 2 else 8
CACHE = Path(f"select-label-tables-{FIRST}.pt")


def tables():
    if CACHE.exists():
        return torch.load(CACHE)
    lm = load_model("smollm2-135m")
    st = S.SelectSettings(sparsity=0.3, examples=24, lengths=(512, 1024), select_layer=FIRST)
    train_ex = S._examples(lm.tokenizer, "train", st, 24, 0)
    val_ex = S._examples(lm.tokenizer, "calib", replace(st, tasks=("needle", "article_qa")), 32, 1)
    r = SelectRouter(select_layer=FIRST)
    routed = RoutedModel(lm.model, Schedule.select_after(lm.model.config.num_hidden_layers, 0.3, FIRST), r)
    out = {}
    with torch.no_grad():
        for split, exs in (("train", train_ex), ("val", val_ex)):
            out[split] = [dict(table=routed(torch.tensor([ex.prompt]), until_routed=True).table[0].float(),
                               evidence=ex.evidence, answer=S.answer_span(ex), task=ex.task, depth=ex.depth)
                          for ex in exs]
    torch.save(out, CACHE)
    return out


def items(rows, sched, recent, label):
    s_block = sched.sparsity[sched.first_routed]
    out = []
    for d in rows:
        seq = d["table"].shape[0]
        pos = torch.arange(seq)
        cand = ~recent_share(pos.float() / (seq - 1), recent, s_block) & (pos > 0)
        target = torch.zeros(seq, dtype=torch.bool)
        a, b = d["evidence"] if label == "evidence" else d["answer"]
        target[a:b] = True
        out.append(S.Item(d["table"], pos, cand, target & cand, block_keep_count(sched, sched.first_routed, seq, 0)))
    return out


@torch.no_grad()
def answers_by_depth(router, rows, sched):
    s_block = sched.sparsity[sched.first_routed]
    kept_by = {}
    for d in rows:
        seq = d["table"].shape[0]
        pos, valid = torch.arange(seq), torch.ones(1, seq, dtype=torch.bool)
        ctx = RouteContext(layer=0, sparsity=s_block, positions=pos[None], valid=valid, attn=d["table"][None])
        sel = routing_scores(router.scores(ctx), valid, forced_tokens(valid, 0))[0]
        kept = torch.zeros(seq, dtype=torch.bool)
        kept[torch.topk(sel, block_keep_count(sched, sched.first_routed, seq, 0)).indices] = True
        a, b = d["answer"]
        kept_by.setdefault(d["task"], [[] for _ in range(5)])[min(int(d["depth"] * 5), 4)].append(bool(kept[a:b].all()))
    return {t: [round(sum(v) / max(len(v), 1), 2) for v in bins] for t, bins in kept_by.items()}


def main():
    data = tables()
    for sp in SPARSITIES:
        sched = Schedule.select_after(30, sp, FIRST)
        for label in ("evidence", "answer"):
            for name, loss_fn in S.LOSSES.items():
                r = SelectRouter(select_layer=FIRST)
                train = items(data["train"], sched, r.recent, label)
                opt = torch.optim.Adam(r.parameters(), lr=0.05)
                for _ in range(150):
                    loss = loss_fn(r, train)
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                res = answers_by_depth(r, data["val"], sched)
                print(f"sparsity {sp} labels {label} loss {name}: w {float(r.recency.detach()):.2f}, answers kept by "
                      f"depth fifth {res}", flush=True)


if __name__ == "__main__":
    main()
