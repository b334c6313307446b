"""What ranking a question-free prompt twice costs: prefill seconds and aten ops of HybridKV at
``derotate_share`` 0.0 / 0.5 / 1.0 beside the plain prefill, on one RULER context
(Qwen2.5-Coder-1.5B, bfloat16, the question fed after compression).

With no question in the prefix HybridKV ranks each layer's tokens by key diversity: on the
cached keys (share 0.0), on the keys with their RoPE undone (1.0), or both and their union (0.5,
the default). The decode path does not depend on the share; this measures the prefill, where
the compression runs. Each round times every configuration once, in turn (``--repeats`` rounds,
median ``generate()`` time to the first token), then one profiled prefill per configuration
counts its aten ops. Writes ``results/question_free_prefill.{csv,json,png}``.

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
from hybridkv.speed import forward_ops
from hybridkv.step_timer import timed_generate

SHARES = (0.0, 0.5, 1.0)
OUT = "results/question_free_prefill"


def prefill_ops(model: torch.nn.Module, prefix: dict, method: HybridKV | None) -> int:
    """aten ops of one prefill forward of ``prefix`` (compression included under ``method``)."""
    with method.apply(model, query_tokens=0) if method is not None else nullcontext():
        return forward_ops(model, **prefix, past_key_values=DynamicCache(), use_cache=True)[0]


def prefill_seconds(model: torch.nn.Module, prefix: dict, method: HybridKV | None) -> float:
    """Seconds from ``generate()``'s call to its first token (prefill and compression)."""
    if method is None:
        return timed_generate(model, prefix, 1).prefill_s
    with method.apply(model, query_tokens=0):
        return timed_generate(model, prefix, 1).prefill_s


def plot(rows: list[dict], path: str) -> None:
    """Bars of median prefill seconds and of aten ops over the plain prefill's, per configuration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3))
    names = [r["config"] for r in rows]
    axes[0].bar(names, [r["prefill_s"] for r in rows])
    axes[0].set_ylabel("prefill s (median)")
    axes[1].bar(names, [r["extra_ops"] for r in rows])
    axes[1].set_ylabel("aten ops beyond the plain prefill")
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
    configs.update({f"HybridKV share {s}": HybridKV(args.budget, derotate_share=s) for s in SHARES})
    prefill_seconds(model, prefix, None)  # warm-up: first-call allocations
    times: dict[str, list[float]] = {name: [] for name in configs}
    for round_ in range(args.repeats):
        for name, method in configs.items():
            times[name].append(prefill_seconds(model, prefix, method))
            print(f"round {round_ + 1}/{args.repeats} {name}: {times[name][-1]:.2f} s", flush=True)
    ops = {name: prefill_ops(model, prefix, method) for name, method in configs.items()}
    plain_s, plain_ops = statistics.median(times["plain prefill"]), ops["plain prefill"]
    rows = [{"config": name, "prefill_s": round(statistics.median(times[name]), 3),
             "vs_plain": round(statistics.median(times[name]) / plain_s, 3), "aten_ops": ops[name],
             "extra_ops": ops[name] - plain_ops, "runs_s": [round(t, 3) for t in times[name]]} for name in configs]
    write_results(rows, OUT, {"benchmark": "question_free_prefill", "task": task.key,
                              "prompt_tokens": int(prefix["input_ids"].shape[1]), "budget": args.budget,
                              "repeats": args.repeats})
    print_table(rows, ["config", "prefill_s", "vs_plain", "aten_ops", "extra_ops"])
    plot(rows, f"{OUT}.png")


if __name__ == "__main__":
    main()
