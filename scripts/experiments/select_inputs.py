"""Issue 20 input screen for the learned selection router (docs/training.md 8.6): which inputs at the
selection block (gemfilter E15 table, RMS-normalised hidden state, neighbouring offsets) predict the
evidence span. Step 1 (this file, `extract N_TRAIN N_TEST`) saves features of train-split examples
(fit) and seed-0 evaluation examples (test); step 2 (`fit`) prints evidence recall per task/length.

usage: .venv/bin/python scripts/experiments/select_inputs.py extract 30 16 && .venv/bin/python scripts/experiments/select_inputs.py fit
(scikit-learn: installed with the `clients` extra, through lm-eval)
"""
import sys

if sys.argv[1] == "extract":
    sys.argv = [sys.argv[0], *sys.argv[2:]]
    import sys, time
    import numpy as np
    import torch
    from tokenskip.models import load_model
    from tokenskip.routers import GemFilterRouter
    from tokenskip.routed import RoutedModel
    from tokenskip.data import load_split
    from tokenskip.train.longctx_tasks import make_examples
    
    torch.set_num_threads(2)
    NTR, NTE = int(sys.argv[1]), int(sys.argv[2])
    lm = load_model("smollm2-135m")
    model = lm.model
    cap = {}
    class Rec(GemFilterRouter):
        def scores(self, ctx):
            if "attn" not in cap:
                cap["attn"] = ctx.attn[0].clone(); cap["s"] = ctx.sparsity
            return super().scores(ctx)
    rt = Rec()
    sched = rt.schedule_for(30, 0.3)
    rm = RoutedModel(model, sched, rt)
    sel = sched.first_routed
    def feats(ex):
        ids = torch.tensor([ex.prompt])
        cap.clear()
        with torch.no_grad():
            rm(ids, last_only=True)
            hs = model(ids, output_hidden_states=True).hidden_states[sel][0]  # input to block sel
        S = ids.shape[1]
        attn = cap["attn"] * S
        attn[0] = 0
        pad = torch.nn.functional.pad(attn, (3, 3))
        pooled = torch.stack([pad[i:i+S] for i in range(7)], -1).amax(-1)
        hn = hs / hs.pow(2).mean(-1, keepdim=True).sqrt()
        pos = torch.arange(S) / (S - 1)
        y = torch.zeros(S); y[ex.evidence[0]:ex.evidence[1]] = 1
        return dict(attn=pooled.numpy(), raw=attn.numpy(), h=hn.numpy(), pos=pos.numpy(), y=y.numpy(), s=cap["s"], S=S, task=ex.task, length=ex.length, depth=ex.depth)
    t0 = time.time()
    wiki_tr = load_split("train")
    tr = make_examples(lm.tokenizer, ["needle", "kv_lookup", "article_qa"], [512, 1024], NTR, seed=11, wiki=wiki_tr, news=wiki_tr)
    te = make_examples(lm.tokenizer, ["needle", "kv_lookup", "article_qa"], [512, 1024], NTE, seed=0)
    F_tr = [feats(e) for e in tr]; print("train feats", time.time() - t0, flush=True)
    F_te = [feats(e) for e in te]; print("test feats", time.time() - t0, flush=True)
    np.save("select_inputs.npy", np.array([F_tr, F_te], dtype=object), allow_pickle=True)

else:
    import numpy as np, math
    from sklearn.linear_model import LogisticRegression
    F_tr, F_te = np.load("select_inputs.npy", allow_pickle=True)
    def cand(f):
        S, s = f["S"], f["s"]
        k = math.ceil((1 - s) * S)
        recent = f["pos"] > 1.0 - 0.5 * (1 - s)
        m = ~recent; m[0] = False; m[-1] = False
        slot = k - recent.sum() - 1 - (0 if recent[-1] else 1)
        return m, max(slot, 0)
    def X(f, which):
        cols = []
        la = np.log(f["attn"] + 1e-3); lr = np.log(f["raw"] + 1e-3)
        if "a" in which: cols += [la[:, None], lr[:, None], f["pos"][:, None]]
        if "h" in which: cols += [f["h"]]
        return np.concatenate(cols, 1)
    def recall(fs, score_fn):
        out = {}
        for f in fs:
            m, slot = cand(f)
            y = f["y"][m]
            if y.sum() == 0: continue
            sc = score_fn(f)[m]
            top = np.argsort(-sc, kind="stable")[:slot]
            r = y[top].sum() / y.sum()
            out.setdefault((f["task"], f["length"]), []).append(r)
            out.setdefault(("all", 0), []).append(r)
        return {k: (np.mean(v), np.mean(np.array(v) > 0.99), len(v)) for k, v in out.items()}
    def fit(which, C=1.0):
        Xs, ys = [], []
        for f in F_tr:
            m, _ = cand(f)
            Xs.append(X(f, which)[m]); ys.append(f["y"][m])
        Xa, ya = np.concatenate(Xs), np.concatenate(ys)
        mu, sd = Xa.mean(0), Xa.std(0) + 1e-6
        clf = LogisticRegression(max_iter=3000, C=C, class_weight="balanced").fit((Xa - mu) / sd, ya)
        return lambda f: clf.decision_function((X(f, which) - mu) / sd)
    res = {"gemfilter attn": recall(F_te, lambda f: f["attn"] + 1e-3 * f["pos"])}
    for w, C in [("a", 1.0), ("ah", 0.01), ("ah", 0.1), ("h", 0.1)]:
        res[f"logreg {w} C={C}"] = recall(F_te, fit(w, C))
    keys = sorted(next(iter(res.values())).keys())
    print("mean evidence recall in the attention slot / all-evidence-kept rate (n)")
    print(" " * 22 + "  ".join(f"{k[0][:8]:>8}@{k[1]:<4}" for k in keys))
    for name, r in res.items():
        print(f"{name:22s}" + "  ".join(f"{r[k][0]:.2f}/{r[k][1]:.2f}({r[k][2]})" for k in keys))
    from sklearn.linear_model import LogisticRegression
    F_tr, F_te = np.load("select_inputs.npy", allow_pickle=True)
    def cand(f, recent_share=0.5):
        S, s = f["S"], f["s"]
        k = math.ceil((1 - s) * S)
        recent = f["pos"] > 1.0 - recent_share * (1 - s)
        m = ~recent; m[0] = False; m[-1] = False
        slot = k - recent.sum() - 1 - (0 if recent[-1] else 1)
        return m, max(slot, 0)
    def shifted(a, lo, hi):  # [S, hi-lo+1]: a[i+o] for o in lo..hi, zero outside
        S = len(a); out = np.zeros((S, hi - lo + 1))
        for j, o in enumerate(range(lo, hi + 1)):
            if o >= 0: out[:S - o, j] = a[o:]
            else: out[-o:, j] = a[:S + o]
        return out
    def pool(a, lo, hi): return shifted(a, lo, hi).max(1)
    def recall(fs, score_fn, rs=0.5):
        out = {}
        for f in fs:
            m, slot = cand(f, rs)
            y = f["y"][m]
            if y.sum() == 0: continue
            sc = score_fn(f)[m]
            top = np.argsort(-sc, kind="stable")[:slot]
            r = y[top].sum() / y.sum()
            out.setdefault((f["task"], f["length"]), []).append(r)
            out.setdefault(("all", 0), []).append(r)
        return {k: (np.mean(v), np.mean(np.array(v) > 0.99), len(v)) for k, v in out.items()}
    def X(f, lo, hi): 
        return np.concatenate([np.log(shifted(f["raw"], lo, hi) + 1e-3), f["pos"][:, None]], 1)
    def fit(lo, hi, C=1.0, rs=0.5):
        Xs, ys = [], []
        for f in F_tr:
            m, _ = cand(f, rs); Xs.append(X(f, lo, hi)[m]); ys.append(f["y"][m])
        Xa, ya = np.concatenate(Xs), np.concatenate(ys)
        mu, sd = Xa.mean(0), Xa.std(0) + 1e-6
        clf = LogisticRegression(max_iter=3000, C=C, class_weight="balanced").fit((Xa - mu) / sd, ya)
        print("   coef", np.round(clf.coef_[0], 2))
        return lambda f: clf.decision_function((X(f, lo, hi) - mu) / sd)
    res = {}
    for rs in (0.5, 0.3):
        res[f"gem pool-3..3 rs{rs}"] = recall(F_te, lambda f: pool(f["raw"], -3, 3) + 1e-3 * f["pos"], rs)
        res[f"pool -6..2 rs{rs}"] = recall(F_te, lambda f: pool(f["raw"], -6, 2) + 1e-3 * f["pos"], rs)
        res[f"pool -10..3 rs{rs}"] = recall(F_te, lambda f: pool(f["raw"], -10, 3) + 1e-3 * f["pos"], rs)
        res[f"logreg -8..8 rs{rs}"] = recall(F_te, fit(-8, 8, 1.0, rs), rs)
        res[f"logreg -12..4 rs{rs}"] = recall(F_te, fit(-12, 4, 1.0, rs), rs)
    keys = sorted(next(iter(res.values())).keys())
    print(" " * 22 + "  ".join(f"{k[0][:8]:>8}@{k[1]:<4}" for k in keys))
    for name, r in res.items():
        print(f"{name:22s}" + "  ".join(f"{r[k][0]:.2f}/{r[k][1]:.2f}({r[k][2]})" for k in keys))
