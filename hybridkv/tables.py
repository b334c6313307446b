"""Summaries of evaluation rows: per (method, budget) figures, markdown tables and a plot."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path


def summarize(rows: Iterable[dict], model_name: str) -> list[dict]:
    """Per (method, budget) of one model: prompts, accuracy % (the mean ``score`` x 100 where rows
    have one, e.g. RULER's share of reference strings found), mean prefix agreement, mean KL, mean
    KV compression ratio (full cache bytes / bytes held), and the share of prompts whose budget
    was exceeded (the method kept tokens it must keep beyond the budget).
    """
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        if row["model"] == model_name:
            groups.setdefault((row["method"], row["budget"]), []).append(row)
    table = []
    for (method, budget), items in sorted(groups.items(), key=lambda kv: (kv[0][0] != "FullKV", kv[0][0], kv[0][1])):
        kls = [r["kl"] for r in items if r["kl"] is not None]
        ratios = [r["kv_ratio"] for r in items if r.get("kv_ratio") is not None]
        n = len(items)
        scores = [r["score"] if "score" in r else float(r["correct"]) for r in items]
        table.append({
            "method": method, "budget": budget, "prompts": n,
            "accuracy": round(100 * sum(scores) / n, 1),
            "prefix_agreement": round(sum(r["prefix_agreement"] for r in items) / n, 3),
            "kl": round(sum(kls) / len(kls), 4) if kls else None,
            "kv_ratio": round(sum(ratios) / len(ratios), 2) if ratios else None,
            "budget_exceeded": round(sum(bool(r.get("budget_exceeded_tokens")) for r in items) / n, 3),
        })
    return table


def markdown_table(table: list[dict], metric: str = "accuracy") -> str:
    """Methods as rows, budgets as columns, ``metric`` in the cells (FullKV: its one value in every
    column, or a column of budget 1.0 when it is the only method); ``*`` marks cells where the method
    kept more than the budget on some prompt."""
    budgets = sorted({r["budget"] for r in table if r["method"] != "FullKV"}) or [1.0]
    methods = list(dict.fromkeys(r["method"] for r in table))
    cell = {(r["method"], r["budget"]): r for r in table}
    full = cell.get(("FullKV", 1.0))
    lines = [f"| method | {' | '.join(str(b) for b in budgets)} | prompts |", "|---" * (len(budgets) + 2) + "|"]
    if full:
        lines.append(f"| FullKV | {' | '.join(str(full[metric]) for _ in budgets)} | {full['prompts']} |")
    for method in methods:
        if method == "FullKV":
            continue
        values = [_cell_text(cell.get((method, b)), metric) for b in budgets]
        prompts = max(cell[(method, b)]["prompts"] for b in budgets if (method, b) in cell)
        lines.append(f"| {method} | {' | '.join(values)} | {prompts} |")
    return "\n".join(lines)


def _cell_text(row: dict | None, metric: str) -> str:
    """A markdown cell: the metric, marked ``*`` when the budget was exceeded on some prompts."""
    if row is None or row[metric] is None:
        return ""
    return str(row[metric]) + ("*" if row.get("budget_exceeded") else "")


def plot(table: list[dict], path: str | Path, metric: str = "accuracy", title: str = "") -> None:
    """``metric`` against budget, one line per method; FullKV dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method in dict.fromkeys(r["method"] for r in table):
        rows = sorted((r for r in table if r["method"] == method and r[metric] is not None), key=lambda r: r["budget"])
        if not rows:
            continue
        if method == "FullKV":
            ax.axhline(rows[0][metric], color="k", ls="--", label="FullKV")
            continue
        style = "o-" if not method.startswith("kvpress") else "s:"
        width = 2.5 if method.startswith("HybridKV") else 1.2
        ax.plot([r["budget"] for r in rows], [r[metric] for r in rows], style, lw=width, label=method)
    ax.set(xlabel="budget (fraction of prompt KV)", ylabel=metric, title=title, xscale="log")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
