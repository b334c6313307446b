"""What HybridKV's question-free ranking costs: prefill seconds, peak memory and aten ops of
HybridKV at ``derotate_share`` 0.0 / 0.5 / 1.0 without the model-wide ranking
(``consensus_share=0.0``) and of the default (share 0.5, ``consensus_share`` 0.5) beside the plain
prefill, on one RULER context (Qwen2.5-Coder-1.5B, bfloat16, the question fed after compression).

With no question in the prefix HybridKV ranks each layer's tokens by key diversity: on the
cached keys (share 0.0), on the keys with their RoPE undone (1.0), or both and their union (0.5);
with the model-wide ranking it compresses after the last layer, holding the whole prompt's KV
until then, as a plain cache does. The decode path depends on neither; this measures the
prefill, where the compression runs. Each round times every configuration once, in turn
(``--repeats`` rounds, median ``generate()`` time to the first token, and the largest RSS rise
above its start over the rounds), then one profiled prefill per configuration counts its aten
ops. Writes ``results/question_free_prefill.{csv,json,png}``.

    python benchmarks/question_free_prefill.py [--length 4096] [--repeats 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
from contextlib import nullcontext

import torch
from transformers import DynamicCache

from hybridkv import HybridKV
from hybridkv.bench import print_table, write_results
from hybridkv.data.ruler import ruler_tasks
from hybridkv.harness import split_tail
from hybridkv.models.loading import load_model
from hybridkv.speed import PeakRSS, forward_ops
from hybridkv.step_timer import timed_generate

SHARES = (0.0, 0.5, 1.0)
OUT = "results/question_free_prefill"


def prefill_ops(model: torch.nn.Module, prefix: dict, method: HybridKV | None) -> int:
    """aten ops of one prefill forward of ``prefix`` (compression included under ``method``)."""
    with method.apply(model, query_tokens=0) if method is not None else nullcontext():
        return forward_ops(model, **prefix, past_key_values=DynamicCache(), use_cache=True)[0]


def prefill_seconds(model: torch.nn.Module, prefix: dict, method: HybridKV | None) -> tuple[float, int]:
    """Seconds from ``generate()``'s call to its first token (prefill and compression), and the
    process's RSS rise above its start meanwhile (bytes)."""
    with PeakRSS() as rss, method.apply(model, query_tokens=0) if method is not None else nullcontext():
        seconds = timed_generate(model, prefix, 1).prefill_s
    return seconds, rss.peak


def plot(rows: list[dict], path: str) -> None:
    """Bars of median prefill seconds, peak RSS rise and aten ops over the plain prefill's, per configuration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.5))
    names = [r["config"] for r in rows]
    axes[0].bar(names, [r["prefill_s"] for r in rows])
    axes[0].set_ylabel("prefill s (median)")
    axes[1].bar(names, [r["peak_rss_mib"] for r in rows])
    axes[1].set_ylabel("peak RSS rise, MiB")
    axes[2].bar(names, [r["extra_ops"] for r in rows])
    axes[2].set_ylabel("aten ops beyond the plain prefill")
    for ax in axes:
        ax.tick_params(axis="x", labelrotation=20, labelsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--task", default="niah_multivalue")
    parser.add_argument("--seed", type=int, default=100, help="RULER seed (default 100, a tuning seed)")
    parser.add_argument("--budget", type=float, default=0.1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model("qwen2.5-coder-1.5b", torch.bfloat16)
    task = ruler_tasks(tokenizer, [args.task], [args.length], [args.seed], protocol="question-after")[0]
    prefix, _ = split_tail(model, task.inputs(), task.tail_tokens)
    configs: dict[str, HybridKV | None] = {"plain prefill": None}
    configs.update({f"share {s}, no consensus": HybridKV(args.budget, derotate_share=s, consensus_share=0.0)
                    for s in SHARES})
    configs["HybridKV default (share 0.5, consensus 0.5)"] = HybridKV(args.budget)
    prefill_seconds(model, prefix, None)  # warm-up: first-call allocations
    runs: dict[str, list[tuple[float, int]]] = {name: [] for name in configs}
    for round_ in range(args.repeats):
        for name, method in configs.items():
            runs[name].append(prefill_seconds(model, prefix, method))
            print(f"round {round_ + 1}/{args.repeats} {name}: {runs[name][-1][0]:.2f} s", flush=True)
    ops = {name: prefill_ops(model, prefix, method) for name, method in configs.items()}
    seconds = {name: statistics.median(t for t, _ in runs[name]) for name in configs}
    rows = [{"config": name, "prefill_s": round(seconds[name], 3), "vs_plain": round(seconds[name] / seconds["plain prefill"], 3),
             "peak_rss_mib": round(max(peak for _, peak in runs[name]) / 2**20, 1), "aten_ops": ops[name],
             "extra_ops": ops[name] - ops["plain prefill"], "runs_s": [round(t, 3) for t, _ in runs[name]]}
            for name in configs]
    write_results(rows, OUT, {"benchmark": "question_free_prefill", "task": task.key,
                              "prompt_tokens": int(prefix["input_ids"].shape[1]), "budget": args.budget,
                              "repeats": args.repeats})
    print_table(rows, ["config", "prefill_s", "vs_plain", "peak_rss_mib", "aten_ops", "extra_ops"])
    plot(rows, f"{OUT}.png")


if __name__ == "__main__":
    main()
