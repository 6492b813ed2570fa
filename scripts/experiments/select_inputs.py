"""Issue 20 input screen for the learned selection router (docs/training.md 8.6): which inputs at the
selection block (gemfilter E15 table, RMS-normalised hidden state, neighbouring offsets) predict the
evidence span. Step 1 (this file, `extract N_TRAIN N_TEST`) saves features of train-split examples
(fit) and seed-0 evaluation examples (test); step 2 (`fit`) prints evidence recall per task/length.

usage: .venv/bin/python scripts/experiments/select_inputs.py extract 30 16
       .venv/bin/python scripts/experiments/select_inputs.py fit
(scikit-learn: installed with the `clients` extra, through lm-eval)
"""
import sys

if sys.argv[1] == "extract":
    import time

    import numpy as np
    import torch

    from tokenskip.data import load_split
    from tokenskip.models import load_model
    from tokenskip.routed import RoutedModel
    from tokenskip.routers import GemFilterRouter, reach_max
    from tokenskip.train.longctx_tasks import make_examples

    torch.set_num_threads(2)
    NTR, NTE = int(sys.argv[2]), int(sys.argv[3])
    lm = load_model("smollm2-135m")
    model = lm.model
    sched = GemFilterRouter().schedule_for(model.config.num_hidden_layers, 0.3)
    rm = RoutedModel(model, sched, GemFilterRouter())
    sel = sched.first_routed

    def feats(ex):
        """The selection block's table (raw and gemfilter's pool of 7, scaled by S, sink zeroed), the
        RMS-normalised hidden state entering the first routed block, position, evidence labels."""
        ids = torch.tensor([ex.prompt])
        with torch.no_grad():
            table = rm(ids, until_routed=True).table[0]  # [S]
            hs = model(ids, output_hidden_states=True).hidden_states[sel][0]  # [S,H] input to block sel
        S = ids.shape[1]
        attn = table * S
        attn[0] = 0
        pooled = reach_max(attn[None], 3, 3)[0]
        hn = hs / hs.pow(2).mean(-1, keepdim=True).sqrt()
        pos = torch.arange(S) / (S - 1)
        y = torch.zeros(S)
        y[ex.evidence[0]:ex.evidence[1]] = 1
        return dict(attn=pooled.numpy(), raw=attn.numpy(), h=hn.numpy(), pos=pos.numpy(), y=y.numpy(),
                    s=sched.sparsity[sel], S=S, task=ex.task, length=ex.length, depth=ex.depth)

    t0 = time.time()
    wiki_tr = load_split("train")
    tasks = ["needle", "kv_lookup", "article_qa"]
    tr = make_examples(lm.tokenizer, tasks, [512, 1024], NTR, seed=11, wiki=wiki_tr, news=wiki_tr)
    te = make_examples(lm.tokenizer, tasks, [512, 1024], NTE, seed=0)
    F_tr = [feats(e) for e in tr]
    print("train feats", time.time() - t0, flush=True)
    F_te = [feats(e) for e in te]
    print("test feats", time.time() - t0, flush=True)
    np.save("select_inputs.npy", np.array([F_tr, F_te], dtype=object), allow_pickle=True)

else:
    import math

    import numpy as np
    from sklearn.linear_model import LogisticRegression

    F_tr, F_te = np.load("select_inputs.npy", allow_pickle=True)

    def cand(f, rs=0.5):
        """Candidates (not the sink, the last token or the recent share rs of the budget) and the
        attention slot: the keep budget left after the recent share and the forced tokens."""
        S, s = f["S"], f["s"]
        k = math.ceil((1 - s) * S)
        recent = f["pos"] > 1.0 - rs * (1 - s)
        m = ~recent
        m[0] = m[-1] = False
        return m, max(k - recent.sum() - 1 - (0 if recent[-1] else 1), 0)

    def shifted(a, lo, hi):  # [S, hi-lo+1]: a[i+o] for o in lo..hi, zero outside
        S = len(a)
        out = np.zeros((S, hi - lo + 1))
        for j, o in enumerate(range(lo, hi + 1)):
            if o >= 0:
                out[:S - o, j] = a[o:]
            else:
                out[-o:, j] = a[:S + o]
        return out

    def pool(a, lo, hi):
        return shifted(a, lo, hi).max(1)

    def recall(fs, score_fn, rs=0.5):
        """Per (task, length): mean evidence recall in the attention slot, share of examples whose
        whole evidence is kept, n."""
        out = {}
        for f in fs:
            m, slot = cand(f, rs)
            y = f["y"][m]
            if y.sum() == 0:
                continue
            top = np.argsort(-score_fn(f)[m], kind="stable")[:slot]
            r = y[top].sum() / y.sum()
            out.setdefault((f["task"], f["length"]), []).append(r)
            out.setdefault(("all", 0), []).append(r)
        return {k: (np.mean(v), np.mean(np.array(v) > 0.99), len(v)) for k, v in out.items()}

    def features(f, which, lo=0, hi=0):
        """a: log pooled/raw attention and position; h: the normalised hidden state; o: log raw
        attention at offsets lo..hi and position."""
        cols = []
        if "a" in which:
            cols += [np.log(f["attn"] + 1e-3)[:, None], np.log(f["raw"] + 1e-3)[:, None], f["pos"][:, None]]
        if "h" in which:
            cols += [f["h"]]
        if "o" in which:
            cols += [np.log(shifted(f["raw"], lo, hi) + 1e-3), f["pos"][:, None]]
        return np.concatenate(cols, 1)

    def fit(which, C=1.0, rs=0.5, lo=0, hi=0):
        """Logistic regression (balanced) on the training examples' candidates -> a score function."""
        Xs, ys = [], []
        for f in F_tr:
            m, _ = cand(f, rs)
            Xs.append(features(f, which, lo, hi)[m])
            ys.append(f["y"][m])
        Xa, ya = np.concatenate(Xs), np.concatenate(ys)
        mu, sd = Xa.mean(0), Xa.std(0) + 1e-6
        clf = LogisticRegression(max_iter=3000, C=C, class_weight="balanced").fit((Xa - mu) / sd, ya)
        return lambda f: clf.decision_function((features(f, which, lo, hi) - mu) / sd)

    res = {"gemfilter attn": recall(F_te, lambda f: f["attn"] + 1e-3 * f["pos"])}
    for w, C in [("a", 1.0), ("ah", 0.01), ("ah", 0.1), ("h", 0.1)]:
        res[f"logreg {w} C={C}"] = recall(F_te, fit(w, C))
    for rs in (0.5, 0.3):
        for lo, hi in ((-3, 3), (-6, 2), (-10, 3)):
            res[f"pool {lo}..{hi} rs{rs}"] = recall(F_te, lambda f, lo=lo, hi=hi: pool(f["raw"], lo, hi) + 1e-3 * f["pos"],
                                                    rs)
        for lo, hi in ((-8, 8), (-12, 4)):
            res[f"logreg {lo}..{hi} rs{rs}"] = recall(F_te, fit("o", 1.0, rs, lo, hi), rs)
    keys = sorted(next(iter(res.values())).keys())
    print("mean evidence recall in the attention slot / all-evidence-kept rate (n)")
    print(" " * 22 + "  ".join(f"{k[0][:8]:>8}@{k[1]:<4}" for k in keys))
    for name, r in res.items():
        print(f"{name:22s}" + "  ".join(f"{r[k][0]:.2f}/{r[k][1]:.2f}({r[k][2]})" for k in keys))
