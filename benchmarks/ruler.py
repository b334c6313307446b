"""RULER's task families (docs/ruler.md) on Qwen2.5-Coder-1.5B: every method at 10% beside kvpress's presses,
per context length and protocol, then one summary across them.

Each (length, protocol) is one ``hybridkv eval --task ruler`` run into the same resumable JSONL
(``results/ruler_qwen2.5-coder-1.5b.jsonl``; question-agnostic keys end in ``-qafter``), in
bfloat16. The summary (``results/ruler_summary.{md,csv,json,png}``) has one column per
(length, protocol): the mean RULER score of each method over every task and seed there, then one
table per task.

    python benchmarks/ruler.py [--lengths 4096 8192] [--protocols answer-after question-after] [--seeds 0 1 2 3 4]
           [--peers kvpress:SnapKV ...] [--variants HybridKV:kernel_size=7 ...] [--summary-only]
"""

import argparse
import json
from collections import defaultdict
from pathlib import Path

from hybridkv.cli import main
from hybridkv.evaluation import METHODS

MODEL = "qwen2.5-coder-1.5b"
OUT = f"results/ruler_{MODEL}"
PEERS = ("kvpress:StreamingLLM", "kvpress:ObservedAttention", "kvpress:SnapKV", "kvpress:PyramidKV", "kvpress:AdaKV")
VARIANTS = {"answer-after": ("HybridKV:kernel_size=7",),
            "question-after": ("HybridKV:consensus_share=0.0", "HybridKV-offline:consensus_share=0.0",
                               "HybridKV:derotate_share=0.0,consensus_share=0.0",
                               "HybridKV-offline:derotate_share=0.0,consensus_share=0.0")}
"""Configurations run beside the defaults, per protocol: with the question, HybridKV with text pooled
over 7 tokens, the default before RULER's tuning seeds 100-102 chose 15; without it, each head's own
ranking alone (no model-wide ranking), the default before the tuning seeds 100-105 chose
``consensus_share`` 0.5, and, older, key diversity ranked on the cached keys alone, the default
before those seeds chose the union with the keys' RoPE undone (docs/ruler.md)."""


def column(row: dict) -> str:
    """``4k aware`` / ``8k agnostic``: the (length, protocol) a row belongs to."""
    protocol = "agnostic" if row["task"].endswith("-qafter") else "aware"
    return f"{row['length'] // 1024}k {protocol}"


def column_groups(rows: list[dict]) -> list[tuple[str, set, set]]:
    """``(label, methods, prompts)`` per table column. Each (length, protocol) compares the methods
    run on at least 90% of its prompts, over the prompts all of them have (``"4k agnostic"``: a run
    stopped part-way leaves a prompt short); methods run on fewer (a slow peer stopped early) get
    a sub-column per set of prompts they ran on (``"4k agnostic, 7 prompts"``), with every other
    method that has all of those."""
    prompts: dict[str, dict[str, set]] = defaultdict(lambda: defaultdict(set))
    for row in rows:
        prompts[column(row)][row["method"]].add(row["task"])
    groups = []
    for col, of in prompts.items():
        most = max(len(tasks) for tasks in of.values())
        partial = {m for m, tasks in of.items() if 10 * len(tasks) < 9 * most}
        main = set(of) - partial
        groups.append((col, main, set.intersection(*(of[m] for m in main))))
        for shared in {frozenset(of[m]) for m in partial}:
            methods = {m for m in of if shared <= of[m]}
            groups.append((f"{col}, {len(shared)} prompts", methods, set(shared)))
    return groups


def summary(rows: list[dict], budget: float) -> tuple[list[dict], str]:
    """Per method, the mean score x 100 in every (length, protocol) column, overall and per task,
    over the prompts of that column every method compared there has a row for (a run stopped
    part-way leaves some prompts short; a column may run fewer methods, the others are blank
    there; methods run on part of a column only are compared on that part, see
    :func:`column_groups`)."""
    rows = [r for r in rows if r["method"] == "FullKV" or r["budget"] == budget]
    cells: dict[tuple, list[float]] = defaultdict(list)
    for col, methods, tasks in column_groups(rows):
        for row in rows:
            if row["task"] in tasks and row["method"] in methods:
                for kind in ("all", row["kind"]):
                    cells[(row["method"], col, kind)].append(row["score"])
    columns = sorted({c for _, c, _ in cells}, key=lambda c: (int(c.split("k")[0]), c))
    methods = ["FullKV", *sorted({m for m, _, _ in cells} - {"FullKV"})]
    table, sections = [], []
    for kind in ["all", *dict.fromkeys(r["kind"] for r in rows)]:
        lines = [f"| method | {' | '.join(columns)} |", "|---" * (len(columns) + 1) + "|"]
        for method in methods:
            values = []
            for col in columns:
                scores = cells.get((method, col, kind))
                value = round(100 * sum(scores) / len(scores), 1) if scores else None
                values.append("" if value is None else f"{value} ({len(scores)})")
                if kind == "all" and value is not None:
                    table.append({"method": method, "column": col, "budget": 1.0 if method == "FullKV" else budget,
                                  "score": value, "prompts": len(scores)})
            lines.append(f"| {method} | {' | '.join(values)} |")
        title = "mean RULER score over every task" if kind == "all" else kind
        sections.append(f"## {title} (score x 100, prompts in brackets), budget {budget}\n\n" + "\n".join(lines))
    return table, "\n\n".join(sections)


def write_summary(budget: float = 0.1) -> None:
    from hybridkv.bench import write_results

    rows = [json.loads(line) for line in Path(f"{OUT}.jsonl").read_text().splitlines() if line.strip()]
    table, markdown = summary(rows, budget)
    write_results(table, "results/ruler_summary", {"benchmark": "ruler", "model": MODEL, "budget": budget})
    Path("results/ruler_summary.md").write_text(markdown + "\n")
    _plot(table, Path("results/ruler_summary.png"))
    print(markdown)


def _plot(table: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = list(dict.fromkeys(r["column"] for r in table))
    methods = list(dict.fromkeys(r["method"] for r in table))
    value = {(r["method"], r["column"]): r["score"] for r in table}
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(columns) + 4), 5))
    width = 0.8 / len(methods)
    for i, method in enumerate(methods):
        ax.bar([c + i * width for c in range(len(columns))], [value.get((method, col), 0) for col in columns], width,
               label=method)
    ax.set_xticks([c + 0.4 - width / 2 for c in range(len(columns))], columns)
    ax.set_ylabel("mean RULER score x 100")
    ax.set_title(f"{MODEL}: RULER at 10% KV budget")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", nargs="+", default=["4096", "8192"])
    parser.add_argument("--protocols", nargs="+", default=["answer-after", "question-after"])
    parser.add_argument("--seeds", nargs="+", default=["0", "1", "2", "3", "4"])
    parser.add_argument("--peers", nargs="*", default=list(PEERS))
    parser.add_argument("--variants", nargs="*", help="other configurations run beside the methods "
                        "(default: VARIANTS of the protocol)")
    parser.add_argument("--threads", default="1")
    parser.add_argument("--summary-only", action="store_true")
    args = parser.parse_args()
    if not args.summary_only:
        for length in args.lengths:
            for protocol in args.protocols:
                main(["--threads", args.threads, "eval", "--model", MODEL, "--dtype", "bfloat16", "--task", "ruler",
                      "--lengths", length, "--seeds", *args.seeds, "--budgets", "0.1", "--protocol", protocol,
                      "--profile", f"results/profiles/{MODEL}.json", "--peers", *args.peers, "--out", OUT,
                      "--methods", *METHODS, *(VARIANTS[protocol] if args.variants is None else args.variants)])
    write_summary()
