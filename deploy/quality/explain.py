"""`tokenskip explain`: which tokens each block of a routed model runs, for one prompt.

The masks come from the very prefill that generation runs (RoutedModel.forward with
last_only=True, as RoutedModel.prefill calls it, plus trace=True): in gather mode each routed
block's LayerTrace.index holds the positions it ran on. Nothing here re-implements routing, so
what explain shows is what `tokenskip generate` does with the same flags.
"""

from __future__ import annotations

import json
from pathlib import Path

import click
import torch

from tokenskip.errors import UserError
from tokenskip.evaluate_cli import model_options

FORMAT = "tokenskip-explain"
# A paragraph long enough for a routing map worth reading (the pipeline's figure 3).
SAMPLE_PROMPT = ("The Roman Empire was the post-Republican state of ancient Rome. It included territory around the "
                 "Mediterranean in Europe, North Africa, and Western Asia, and was ruled by emperors. From the "
                 "accession of Augustus to the military anarchy of the third century, it was a principate with "
                 "Italy as the metropole of its provinces and the city of Rome as its sole capital.")
_DECODE_WINDOW = 16  # tokens of left context when decoding one token's text (O(S), not O(S^2))


def keep_masks(traces, seq: int) -> list[list[int]]:
    """LayerTraces of a batch-1 gather-mode forward -> [L][S] 0/1: did block l run token t."""
    masks = []
    for li, tr in enumerate(traces):
        if tr.index is not None:
            row = torch.zeros(seq, dtype=torch.int64)
            row[tr.index[0].cpu()] = 1  # [k] kept positions
        elif tr.k in (0, seq):  # a removed block (ShortGPT) runs no token, a dense block every token
            row = torch.full((seq,), int(tr.k == seq), dtype=torch.int64)
        else:
            raise RuntimeError(f"block {li}: trace without kept positions (k={tr.k}); explain needs gather mode")
        masks.append(row.tolist())
    return masks


def token_texts(tokenizer, ids: list[int]) -> list[str]:
    """Each token's text as it appears in the decoded prompt (the difference of two decodes with a
    little left context, so leading spaces survive and the concatenation reads like the prompt)."""
    out = []
    for i in range(len(ids)):
        lo = max(0, i - _DECODE_WINDOW)
        before = tokenizer.decode(ids[lo:i], skip_special_tokens=False)
        upto = tokenizer.decode(ids[lo:i + 1], skip_special_tokens=False)
        common = len(before) if upto.startswith(before) else len(_common_prefix(before, upto))
        out.append(upto[common:])
    return out


def _common_prefix(a: str, b: str) -> str:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return a[:n]


@torch.no_grad()
def explain_prompt(routed, tokenizer, prompt: str, model_name: str = "", router_name: str = "") -> dict:
    """Run the routed prefill on one prompt and return the explain JSON (keep masks per block)."""
    if not prompt.strip():
        raise UserError("--prompt is empty: give some text to route")
    ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]  # as `tokenskip generate` encodes it
    if not ids:
        raise UserError("--prompt encodes to 0 tokens: give some text to route")
    limit = getattr(routed.model.config, "max_position_embeddings", None)
    if limit and len(ids) > limit:
        raise UserError(f"--prompt is {len(ids)} tokens; the model takes at most {limit}")
    device = next(routed.model.parameters()).device
    x = torch.tensor([ids], dtype=torch.int64, device=device)  # [1,S]
    mask = torch.ones_like(x)  # [1,S] one prompt: no padding, as generate runs it
    out = routed.forward(x, mask, last_only=True, trace=True)  # RoutedModel.prefill's call, traced
    seq, n_blocks = len(ids), len(routed.layers)
    keep = keep_masks(out.traces, seq) if out.traces else [[1] * seq for _ in range(n_blocks)]
    runs = [sum(col) for col in zip(*keep)]
    forced = next((tr.forced for tr in out.traces if tr.forced is not None), None)  # [1,S] bool
    texts = token_texts(tokenizer, ids)
    nxt = int(out.logits[0, -1].argmax())
    routed_on = routed.router is not None
    router_name = router_name or (type(routed.router).__name__.replace("Router", "").lower() if routed_on else "dense")
    return {"format": FORMAT, "version": 1, "model": model_name, "router": router_name,
            "kv_policy": routed.kv_policy, "prompt": prompt,
            "schedule": list(routed.schedule.sparsity) if routed_on else [0.0] * n_blocks,
            "target": routed.schedule.overall() if routed_on else 0.0,
            "overall": 1.0 - sum(runs) / (seq * n_blocks),
            "tokens": [{"id": int(i), "text": t} for i, t in zip(ids, texts)],
            "keep": keep, "kept": [sum(row) for row in keep], "blocks_run": runs,
            "forced": [int(v) for v in forced[0].tolist()] if forced is not None else [0] * seq,
            "next_token": {"id": nxt, "text": tokenizer.decode([nxt], skip_special_tokens=False)}}


# ------------------------------------------------------------------------------------ terminal
LIGHT, DARK = (255, 247, 188), (140, 45, 4)  # few blocks -> all blocks


def _shade(frac: float) -> str:
    r, g, b = (round(lo + (hi - lo) * frac) for lo, hi in zip(LIGHT, DARK))
    fg = "white" if frac > 0.55 else "black"
    return f"{fg} on rgb({r},{g},{b})"


def render(data: dict, console) -> None:
    """The prompt shaded by blocks run per token, a legend, and the block x token map if it fits."""
    from rich.text import Text

    n_blocks = len(data["keep"])
    routed_blocks = sum(1 for s in data["schedule"] if s > 0)
    console.print(Text(f"{data['model'] or 'model'} · {data['router']} router · kv_policy={data['kv_policy']} · "
                       f"{n_blocks} blocks ({routed_blocks} routed) · schedule mean sparsity {data['target']:.3f} · "
                       f"this prompt: {len(data['tokens'])} tokens, {100 * data['overall']:.1f}% of (token, block) "
                       "pairs skipped", style="bold"))
    text = Text()
    for tok, runs in zip(data["tokens"], data["blocks_run"]):
        text.append(tok["text"], style=_shade(runs / n_blocks))
    console.print(text)
    legend = Text("shade = blocks the token ran through: ")
    for v in sorted({0, n_blocks // 2, n_blocks, min(data["blocks_run"]), max(data["blocks_run"])}):
        legend.append(f" {v} ", style=_shade(v / n_blocks))
        legend.append(" ")
    legend.append(f"(of {n_blocks}); next token: {data['next_token']['text']!r}")
    console.print(legend)
    seq = len(data["tokens"])
    if seq + 12 <= console.width:
        console.print(Text("block  runs (█) / skips (·) each token", style="dim"))
        for b, row in enumerate(data["keep"]):
            console.print(Text(f"{b:>5}  " + "".join("█" if v else "·" for v in row)))
    else:
        console.print(Text(f"(the {n_blocks} x {seq} block map is wider than the terminal: see --json or "
                           "`tokenskip report --plots`)", style="dim"))


@click.command("explain")
@model_options
@click.option("--prompt", required=True, help="Text to route (encoded as `tokenskip generate` encodes it).")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the per-block keep masks as JSON.")
@click.option("--out", "out_file", type=click.Path(), default=None, help="Also write the JSON here (figure 3's input).")
@click.pass_context
def explain(ctx, model, router, sparsity, schedule, routers_dir, kv_policy, seed, prompt, device, as_json, out_file):
    """Show which tokens each block runs for one prompt, from the routed prefill that generation runs.

    In the terminal the prompt's tokens are shaded by how many blocks each ran through; --json gives
    the keep mask of every block (1 = the block ran on the token).

    \b
    Examples:
      tokenskip explain --router static --sparsity 0.3 --prompt "The capital of France is Paris."
      tokenskip explain --routers out/fit/routers --prompt "Once upon a time" --json
      tokenskip explain --routers out/fit/routers --prompt "..." --out explain.json
      tokenskip report out/fit --plots figs --plot-json explain.json
    """
    from ..cli import build_torch_routed

    if not as_json:
        try:
            from rich.console import Console
        except ImportError:
            from tokenskip.train.plots.common import missing_extra

            raise missing_extra("the terminal view of `tokenskip explain` (or use --json)") from None
    if out_file and Path(out_file).is_dir():
        raise UserError(f"--out {out_file}: is a folder; give a file name (e.g. explain.json)")
    lm, routed, cfg = build_torch_routed(ctx, model, router, sparsity, schedule, routers_dir, kv_policy, seed, device)
    data = explain_prompt(routed, lm.tokenizer, prompt, model_name=cfg.model or lm.name, router_name=cfg.router)
    if out_file:
        from tokenskip.fileio import write_json_atomic

        write_json_atomic(out_file, data)
    if as_json:
        click.echo(json.dumps(data, indent=2))
    else:
        render(data, Console(highlight=False))
