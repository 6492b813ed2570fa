"""Markdown for quality results: the table `eval`, `report` and the pipeline print, and the line that
states a paired comparison. Kept apart from the CLI so reports (train/) format without importing one."""

from __future__ import annotations

import math


def _num(v, spec: str) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def _with_ci(v, ci, spec: str) -> str:
    """'1.094 [1.071, 1.118]': a value with its bootstrap 95% CI when there is one."""
    if ci is None or v is None:
        return _num(v, spec)
    return f"{_num(v, spec)} [{_num(ci[0], spec)}, {_num(ci[1], spec)}]"


def quality_markdown(rows: list[dict], title: str | None = None, tasks: bool = False) -> str:
    """The quality table, one row per method, FLOPs next to quality so rows compare at equal compute;
    bootstrap 95% CIs in brackets. `tasks` adds the multiple-choice columns."""
    head = "| method | sparsity | FLOPs vs dense | cont. ppl | ppl ratio [95% CI] | KL to dense [95% CI] | top-1 agree |"
    sep = "|---|---|---|---|---|---|---|"
    if tasks:
        head += " MC acc | MC retention [95% CI] |"
        sep += "---|---|"
    lines = [f"**{title}**", ""] if title else []
    lines += [head, sep]
    for r in rows:
        line = (f"| {r['method']} | {_num(r.get('sparsity'), '.3f')} | {_num(r.get('flops'), '.3f')} | "
                f"{_num(r.get('ppl'), '.2f')} | {_with_ci(r.get('ppl_ratio'), r.get('ppl_ratio_ci'), '.3f')} | "
                f"{_with_ci(r.get('kl'), r.get('kl_ci'), '.4f')} | {_num(r.get('top1'), '.3f')} |")
        if tasks:
            line += (f" {_num(r.get('mc_acc'), '.3f')} | "
                     f"{_with_ci(r.get('mc_retention'), r.get('mc_retention_ci'), '.3f')} |")
        lines.append(line)
    return "\n".join(lines)


def comparison_line(c: dict) -> str:
    """One sentence for a paired comparison (tokenskip.evaluate.compare), claiming only what the CI
    supports."""
    lo, hi = c["kl_diff_ci"]
    verdict = ("has lower KL than" if c["a_better_kl"] else "has higher KL than" if c["b_better_kl"]
               else "is not distinguishable in KL (the CI spans 0) from")
    return (f"{c['a']} vs {c['b']}: KL difference {c['kl_diff']:+.4f} [95% CI {lo:+.4f}, {hi:+.4f}]: "
            f"{c['a']} {verdict} {c['b']}; perplexity ratio {c['ppl_ratio']:.3f} "
            f"[{c['ppl_ratio_ci'][0]:.3f}, {c['ppl_ratio_ci'][1]:.3f}]")
