"""Check an export folder against the PyTorch routed model it came from.

The PyTorch side is rebuilt from the folder alone (export.json + routing/), in the export's dtype;
the ONNX side runs in ONNX Runtime's CPU execution provider with no custom-op library: the
tokenskip nodes execute through their model-local function bodies. Compared, per output of a
prefill call (empty past): max abs / rel error of every float output (logits, new.*.key/value),
exact equality of integer/bool outputs (new.*.pos, new.*.valid) and of the selected indices
(index.*), top-1 agreement of the logits; then a greedy decode through the ONNX Runtime backend
the runtime uses (`OrtBackend`: the same graph with the preallocated cache bound in place),
against RoutedModel.prefill / decode_step, compared token by token.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from tokenskip.deploy.runtime.generation import left_pad
from tokenskip.errors import UserError
from tokenskip.routed import default_positions

from tokenskip.export.sidecar import ROUTING_DIR, read_export
from tokenskip.export.wrappers import StepGraph

FALLBACK_TEXT = (
    "The history of the city begins with a small settlement on the river, where traders exchanged "
    "grain, salt and timber. Over the following centuries the town grew into a regional centre: a "
    "cathedral was built, a university was founded, and the first printing press arrived. During the "
    "industrial period, factories and railways changed the landscape, and the population tripled in "
    "fifty years. Today the city is known for its museums, its parks along the old city walls, and a "
    "yearly music festival that draws visitors from across the continent. Scientists at the university "
    "study climate, medicine and computer science, and several companies have grown out of their work. "
    "The river, once the reason for the settlement, is now used mostly for leisure: rowing clubs train "
    "on it every morning, and in summer people swim from the wooden platforms near the botanical garden."
)


@dataclass
class Comparison:
    name: str  # case name
    batch: int
    seq: int
    outputs: dict = field(default_factory=dict)  # output -> {max_abs, max_rel, ok} or {exact, ok}
    top1: float = 1.0
    failures: list = field(default_factory=list)

    def to_json(self) -> dict:
        return {"case": self.name, "batch": self.batch, "seq": self.seq, "top1_agreement": self.top1,
                "outputs": self.outputs, "failures": self.failures}


def _compare_float(a: np.ndarray, b: np.ndarray, atol: float, rtol: float) -> dict:
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    if a.shape != b.shape:
        return {"max_abs": float("inf"), "max_rel": float("inf"), "ok": False, "shape": [list(a.shape), list(b.shape)]}
    diff = np.abs(a64 - b64)
    max_abs = float(diff.max()) if diff.size else 0.0
    scale = float(np.abs(b64).max()) if b64.size else 0.0
    ok = bool(np.all(diff <= atol + rtol * np.abs(b64))) and bool(np.isfinite(a64).all())
    return {"max_abs": max_abs, "max_rel": max_abs / scale if scale > 0 else max_abs, "ok": ok}


def _compare_exact(a: np.ndarray, b: np.ndarray) -> dict:
    same = a.shape == b.shape and bool(np.array_equal(a.astype(b.dtype), b))
    out = {"exact": same, "ok": same}
    if not same and a.shape == b.shape:
        out["mismatches"] = int((a.astype(b.dtype) != b).sum())
    return out


def compare_outputs(name: str, onnx_out: dict, torch_out: dict, atol: float, rtol: float, batch: int,
                    seq: int) -> Comparison:
    cmp = Comparison(name=name, batch=batch, seq=seq)
    for key, ref in torch_out.items():
        got = onnx_out[key]
        if np.issubdtype(ref.dtype, np.floating):
            cmp.outputs[key] = _compare_float(got, ref, atol, rtol)
        else:
            cmp.outputs[key] = _compare_exact(got, ref)
        if not cmp.outputs[key]["ok"]:
            cmp.failures.append(key)
    if "logits" in torch_out:
        cmp.top1 = float((onnx_out["logits"].argmax(-1) == torch_out["logits"].argmax(-1)).mean())
    return cmp


# --------------------------------------------------------------------------------------- inputs
def eval_token_ids(tokenizer, window: int, count: int) -> tuple[list[list[int]], str]:
    """Token windows of the built-in eval text (tokenskip.data), or a fixed paragraph if that
    module is not available in this install."""
    try:
        from tokenskip.data import load_split, token_windows
    except ImportError:
        load_split = token_windows = None
    if load_split is not None:
        try:
            texts = load_split("eval")
            wins = token_windows(tokenizer, texts, window, count)
            rows = [list(map(int, w)) for w in (wins.tolist() if hasattr(wins, "tolist") else wins)]
            if rows:
                return rows[:count], "tokenskip.data eval split"
        except UserError:
            raise
        except Exception:  # noqa: BLE001 - data module still being written: fall back
            pass
    ids = tokenizer(FALLBACK_TEXT)["input_ids"]
    while len(ids) < window * count:
        ids = ids + ids
    return [ids[i * window:(i + 1) * window] for i in range(count)], "built-in fallback paragraph"


def make_cases(tokenizer, vocab: int, batches: list[int], samples: int, window: int, seed: int):
    """[(name, input_ids, attention_mask)]: eval text (rows cut to different lengths, left-padded)
    and random token ids with random shapes."""
    rng = np.random.default_rng(seed)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    cases = []
    rows, source = eval_token_ids(tokenizer, window, max(batches))
    for b in batches:
        cut = [rows[i % len(rows)][: (window if i == 0 else int(rng.integers(window // 2, window + 1)))]
               for i in range(b)]
        ids, mask = left_pad(cut, pad)
        cases.append((f"eval b{b}", ids, mask))
    for b in batches:
        for s in range(samples):
            seq = int(rng.integers(8, 2 * window + 1))
            lengths = [seq] + [int(rng.integers(2, seq + 1)) for _ in range(b - 1)]
            rows_r = [rng.integers(0, vocab, n).tolist() for n in lengths]
            ids, mask = left_pad(rows_r, pad)
            cases.append((f"random b{b} #{s}", ids, mask))
    return cases, source


# ------------------------------------------------------------------------------------ the check
def load_reference(export_dir: Path, side: dict, loaded=None):
    """The PyTorch routed model the export came from, rebuilt from export.json + routing/ with the
    LLM loaded in the export's dtype (`loaded` is reused when it already is)."""
    from tokenskip.config import build_routed
    from tokenskip.models import load_model
    from tokenskip.precision import DTYPES

    dtype = DTYPES[side.get("dtype", "fp32")]
    if loaded is None or next(loaded.model.parameters()).dtype != dtype:
        loaded = load_model(side["model"], dtype=dtype)
    routed, cfg = build_routed(loaded.model, routers_dir=export_dir / ROUTING_DIR, kv_policy=side["kv_policy"],
                               model_name=side["model"])
    routed.eval()
    return loaded, routed


def empty_past(graph: StepGraph, batch: int) -> list[torch.Tensor]:
    """The past of a prefill call: length 0 for every layer (seq-major)."""
    cfg = graph.routed.model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    dtype = next(graph.routed.model.parameters()).dtype
    out = []
    for _ in graph.layers:
        out += [torch.empty(0, batch, cfg.num_key_value_heads, head_dim, dtype=dtype),
                torch.empty(0, batch, cfg.num_key_value_heads, head_dim, dtype=dtype),
                torch.empty(0, batch, dtype=torch.int64), torch.empty(0, batch, dtype=torch.bool)]
    return out


def _np(t: torch.Tensor) -> np.ndarray:
    return t.float().numpy() if t.is_floating_point() else t.numpy()


def greedy_compare(backend, routed, ids: torch.Tensor, mask: torch.Tensor, steps: int, atol: float) -> dict:
    """Greedy decode with the ONNX Runtime backend and with PyTorch, token by token."""
    logits, cache = backend.prefill(ids, mask)
    with torch.no_grad():
        ref_logits, ref_cache = routed.prefill(ids, mask)
    on_tok, pt_tok = logits.argmax(-1), ref_logits.float().argmax(-1)
    onnx_tokens, torch_tokens = [on_tok], [pt_tok]
    max_abs = float((logits.double() - ref_logits.double()).abs().max())
    pos = mask.sum(-1, keepdim=True)  # next position id of every row
    diverged = not torch.equal(on_tok, pt_tok)
    for _ in range(steps - 1):
        logits, cache = backend.decode(on_tok[:, None], pos, cache)
        with torch.no_grad():
            ref_logits, ref_cache = routed.decode_step(pt_tok[:, None], pos, ref_cache)
        if not diverged:  # logits are comparable only while both saw the same tokens
            max_abs = max(max_abs, float((logits.double() - ref_logits.double()).abs().max()))
        on_tok, pt_tok = logits.argmax(-1), ref_logits.float().argmax(-1)
        onnx_tokens.append(on_tok)
        torch_tokens.append(pt_tok)
        diverged = diverged or not torch.equal(on_tok, pt_tok)
        pos = pos + 1
    a, b = torch.stack(onnx_tokens, 1).numpy(), torch.stack(torch_tokens, 1).numpy()  # [B,steps]
    same = a == b
    first = None
    if not same.all():
        first = int(np.argmax(~same.all(0)))
    return {"batch": int(ids.shape[0]), "prompt_len": int(ids.shape[1]), "tokens": steps,
            "identical": bool(same.all()), "agree_fraction": float(same.mean()), "first_mismatch_step": first,
            "max_abs_logits": max_abs, "ok": bool(same.all()) and max_abs <= atol,
            "onnx_tokens": a.tolist(), "torch_tokens": b.tolist(),
            "cache_bytes": {"onnx": backend.cache_nbytes(cache)}}


def run_validation(export_dir: str | os.PathLike, *, atol: float = 1e-3, rtol: float = 0.0,
                   batches: list[int] = (1, 4), decode_tokens: int = 32, samples: int = 2, window: int = 96,
                   seed: int = 0, loaded=None, log=None) -> dict:
    """Compare the ONNX graph of `export_dir` with the PyTorch routed model. Returns a report dict
    with `passed` and `failures` (each naming the case and the output)."""
    from tokenskip.deploy.runtime.ort_backend import OrtBackend

    log = log or (lambda msg: None)
    export_dir = Path(export_dir)
    side = read_export(export_dir, "EXPORT_DIR")
    if atol < 0 or rtol < 0:
        raise UserError("--atol/--rtol must be >= 0")
    if decode_tokens < 0:
        raise UserError("--decode-tokens must be >= 0")
    if any(b < 1 for b in batches):
        raise UserError("--batch sizes must be >= 1")
    t0 = time.perf_counter()
    log(f"loading the PyTorch reference ({side['model']}, {side['routing']['router']} router, "
        f"kv_policy={side['kv_policy']}, {side['dtype']})...")
    loaded, routed = load_reference(export_dir, side, loaded)
    log("loading the ONNX graph into ONNX Runtime (CPU EP, function bodies, no custom-op library)...")
    threads = int(os.environ.get("TOKENSKIP_ORT_THREADS", "0")) or None
    backend = OrtBackend(export_dir, threads=threads)
    graph = StepGraph(routed).eval()
    names = graph.output_names()
    if sorted(backend.outputs) != sorted(names):
        missing = sorted(set(names) ^ set(backend.outputs))
        raise UserError(f"{export_dir}: the graph's outputs do not match the routed model "
                        f"(first difference: {missing[0]}); re-export")
    cases, source = make_cases(loaded.tokenizer, routed.model.config.vocab_size, list(batches), samples, window, seed)
    comparisons = []
    for name, ids, mask in cases:
        log(f"prefill {name}: [{ids.shape[0]}, {ids.shape[1]}]")
        positions = default_positions(mask.bool())
        got = backend.run(ids, mask, positions)
        with torch.no_grad():
            ref = graph(ids, mask, positions, *empty_past(graph, ids.shape[0]))
        comparisons.append(compare_outputs(name, {n: _np(got[n]) for n in names},
                                           {n: _np(t) for n, t in zip(names, ref)}, atol, rtol,
                                           int(ids.shape[0]), int(ids.shape[1])))
    decodes = []
    if decode_tokens > 0:
        for name, ids, mask in cases:
            if not name.startswith("eval"):
                continue
            log(f"greedy decode {decode_tokens} tokens, {name}...")
            res = greedy_compare(backend, routed, ids, mask, decode_tokens, atol)
            res["case"] = name
            decodes.append(res)
    failures = [f"{c.name}: {o}" for c in comparisons for o in c.failures]
    for d in decodes:
        if not d["identical"]:
            failures.append(f"greedy {d['case']}: tokens differ from step {d['first_mismatch_step']}")
        elif d["max_abs_logits"] > atol:
            failures.append(f"greedy {d['case']}: logits (max abs {d['max_abs_logits']:.3e} > atol)")
    report = {
        "export": str(export_dir), "model": side["model"], "router": side["routing"]["router"],
        "kv_policy": side["kv_policy"], "dtype": side.get("dtype"), "opset": side.get("opset"),
        "atol": atol, "rtol": rtol, "text_source": source, "runtime": "onnxruntime CPUExecutionProvider "
        "(function bodies, no custom-op library; IOBinding, cache written in place)",
        "prefill": [c.to_json() for c in comparisons], "decode": decodes,
        "summary": summarize(comparisons, decodes), "failures": failures, "passed": not failures,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    return report


def _group(name: str) -> str:
    parts = name.split(".")
    if parts[0] == "new":
        return f"new.*.{parts[2]}"
    if parts[0] == "index":
        return "index.*"
    return name


def summarize(comparisons: list[Comparison], decodes: list[dict]) -> dict:
    """Worst case per output group over all cases (for the table)."""
    groups: dict[str, dict] = {}
    for c in comparisons:
        for name, res in c.outputs.items():
            g = groups.setdefault(_group(name), {"outputs": 0, "ok": True, "worst": None})
            g["outputs"] += 1
            g["ok"] = g["ok"] and res["ok"]
            if "max_abs" in res:
                g["max_abs"] = max(g.get("max_abs", 0.0), res["max_abs"])
                g["max_rel"] = max(g.get("max_rel", 0.0), res["max_rel"])
                if g["max_abs"] == res["max_abs"]:
                    g["worst"] = f"{c.name}: {name}"
            else:
                g["exact"] = g.get("exact", True) and res["exact"]
                if not res["exact"] and g["worst"] is None:
                    g["worst"] = f"{c.name}: {name}"
    top1 = min((c.top1 for c in comparisons), default=1.0)
    return {"groups": groups, "min_top1_agreement": top1,
            "greedy_identical": all(d["identical"] for d in decodes) if decodes else None}


def format_report(report: dict) -> str:
    lines = [f"tokenskip validate {report['export']}",
             f"  model {report['model']}, router {report['router']}, kv_policy {report['kv_policy']}, "
             f"dtype {report['dtype']}, opset {report['opset']}",
             f"  runtime: {report['runtime']}; text: {report['text_source']}",
             f"  tolerance: atol {report['atol']:g}, rtol {report['rtol']:g}", ""]
    hdr = f"  {'case':<16} {'shape':>9} {'logits max abs':>15} {'rel':>9} {'top-1':>6} {'k/v max abs':>12} " \
          f"{'pos/valid':>9} {'index':>6}  result"
    lines += [hdr, "  " + "-" * (len(hdr) - 2)]
    for c in report["prefill"]:
        outs = c["outputs"]
        lg = outs.get("logits", {})
        kv = max((v["max_abs"] for k, v in outs.items() if k.startswith("new.") and "max_abs" in v), default=0.0)
        pv = all(v["ok"] for k, v in outs.items() if k.endswith((".pos", ".valid")))
        idx = [v["ok"] for k, v in outs.items() if k.startswith("index.")]
        idx_s = ("exact" if all(idx) else "DIFF") if idx else "-"
        res = "ok" if not c["failures"] else "FAIL " + ", ".join(c["failures"][:3]) + \
            (f" (+{len(c['failures']) - 3})" if len(c["failures"]) > 3 else "")
        lines.append(f"  {c['case']:<16} {str(c['batch']) + 'x' + str(c['seq']):>9} {lg.get('max_abs', 0):>15.3e} "
                     f"{lg.get('max_rel', 0):>9.1e} {c['top1_agreement']:>6.2f} {kv:>12.3e} "
                     f"{'exact' if pv else 'DIFF':>9} {idx_s:>6}  {res}")
    if report["decode"]:
        lines += ["", f"  {'greedy decode':<16} {'batch':>5} {'tokens':>6} {'agree':>6} {'logits max abs':>15}  result"]
        for d in report["decode"]:
            res = "identical" if d["identical"] else f"FAIL: differs from step {d['first_mismatch_step']}"
            lines.append(f"  {d['case']:<16} {d['batch']:>5} {d['tokens']:>6} {d['agree_fraction']:>6.2f} "
                         f"{d['max_abs_logits']:>15.3e}  {res}")
    lines.append("")
    if report["passed"]:
        lines.append(f"PASSED ({report['seconds']} s)")
    else:
        lines.append(f"FAILED: {len(report['failures'])} check(s) past tolerance; first: {report['failures'][0]}")
    return "\n".join(lines)
