"""Figure 3: the routing map of one prompt, from `tokenskip explain --json`.

Tokens on x (their text), blocks on y (block 0 at the top, as the forward pass runs), each cell
kept (the block ran on the token) or skipped; above it, how many blocks each token ran through.
"""

from __future__ import annotations

from .common import new_figure
from .inputs import check_explain

KEPT, SKIPPED = "#1f4e79", "#e6e6e6"


def token_label(text: str) -> str:
    """A token's text as an axis label: visible whitespace, no line breaks."""
    shown = text.replace("\n", "\\n").replace("\t", "\\t")
    return shown if shown.strip() else shown.replace(" ", "·") or "∅"


def routing_data(explain: dict, where: str = "explain JSON") -> dict:
    """The explain JSON is already exactly the data figure 3 draws: check it and tag it."""
    return {**check_explain(explain, where), "figure": "routing_map"}


def draw_routing(data: dict):
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    keep = data["keep"]  # [L][S]
    n_blocks, n_tok = len(keep), len(data["tokens"])
    fig = new_figure(min(40.0, max(8.0, 0.2 * n_tok + 2.5)), min(30.0, max(5.0, 0.16 * n_blocks + 3.0)))
    ax_runs, ax = fig.subplots(2, 1, sharex=True, height_ratios=(1, 3))
    tokens = list(range(n_tok))
    bars = ax_runs.bar(tokens, data["blocks_run"], width=0.8, color=KEPT)
    bars.set_label("blocks run")
    ax_runs.set_ylim(0, n_blocks)
    ax_runs.axhline(n_blocks, color="black", ls=":", lw=1)
    ax_runs.set_ylabel(f"blocks run\n(of {n_blocks})")
    ax_runs.grid(True, axis="y", alpha=0.3)
    ax.imshow(keep, aspect="auto", interpolation="nearest", cmap=ListedColormap([SKIPPED, KEPT]), vmin=0, vmax=1)
    ax.set_ylabel("block (0 = first)")
    sched = data.get("schedule") or [0.0] * n_blocks
    step = max(1, n_blocks // 32)
    ax.set_yticks(range(0, n_blocks, step))
    ax.set_yticklabels([f"{b} (s={sched[b]:.2f})" if sched[b] > 0 else f"{b} (dense)"
                        for b in range(0, n_blocks, step)], fontsize=7)
    every = max(1, n_tok // 120)
    ax.set_xticks(tokens[::every])
    ax.set_xticklabels([token_label(t["text"]) for t in data["tokens"]][::every], rotation=90, fontsize=7)
    ax.set_xlabel("prompt token (text shown)")
    ax.legend(handles=[Patch(color=KEPT, label="runs the block"), Patch(color=SKIPPED, label="skips the block")],
              loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    what = f"{data.get('router', '?')} router, schedule mean sparsity {data.get('target', 0.0):.2f}, " \
           f"{100 * data.get('overall', 0.0):.1f}% of (token, block) pairs skipped here"
    prompt = data.get("prompt", "")
    prompt = prompt if len(prompt) <= 90 else prompt[:87] + "..."
    fig.suptitle(f"{data.get('model') or 'model'}: which blocks each token runs\n{what}, "
                 f"kv_policy={data.get('kv_policy', '?')}\nprompt: {prompt!r}", fontsize=10)
    return fig
