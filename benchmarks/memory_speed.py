"""Bytes held and decode ms/token of FullKV, SnapKV, AdaKV and HybridKV (device and host
stores) at budgets 0.05 / 0.1 / 0.2 on one multi-image prompt (tiny random Qwen2.5-VL with a
small vocabulary, so that the KV cache dominates decoding), side by side in one process.

Writes ``results/memory_speed.{csv,json,png}``.

    python benchmarks/memory_speed.py [--images 4 --grid 64 --new-tokens 32 --repeats 3]
"""

from __future__ import annotations

import argparse

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from hybridkv import AdaKV, FullKV, HybridKV, SnapKV
from hybridkv.bench import (
    TINY_VL_DESCRIPTION,
    add_tiny_vl_arguments,
    measure,
    print_table,
    tiny_vl_setting,
    write_results,
)

BUDGETS = (0.05, 0.1, 0.2)
COLUMNS = ["method", "resident_kv_bytes", "offloaded_kv_bytes", "x_less_kv", "attended_tokens_per_step", "prefill_s",
           "decode_ms_per_token"]


def plot(rows: list[dict], path: str) -> None:
    """Two panels: KV bytes (all tiers) and decode ms/token against the budget, one line per method."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    families = sorted({r["method"].split("@")[0] for r in rows if "@" in r["method"]})
    full = next(r for r in rows if r["method"] == "FullKV")
    for family in families:
        mine = [r for r in rows if r["method"].startswith(family + "@")]
        budgets = [r["budget"] for r in mine]
        axes[0].plot(budgets, [(r["resident_kv_bytes"] + r["offloaded_kv_bytes"]) / 2**20 for r in mine], "o-", label=family)
        axes[1].plot(budgets, [r["decode_ms_per_token"] for r in mine], "o-", label=family)
    axes[0].axhline(full["resident_kv_bytes"] / 2**20, color="k", ls="--", label="FullKV")
    axes[1].axhline(full["decode_ms_per_token"], color="k", ls="--", label="FullKV")
    axes[0].set(xlabel="budget", ylabel="KV MiB held (all tiers)", yscale="log")
    axes[1].set(xlabel="budget", ylabel="decode ms/token (median)")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_tiny_vl_arguments(parser, "results/memory_speed")
    args = parser.parse_args()
    model, inputs = tiny_vl_setting(args.images, args.grid)
    methods = {"FullKV": FullKV()}
    for budget in BUDGETS:
        methods[f"SnapKV@{budget}"] = SnapKV(budget)
        methods[f"AdaKV@{budget}"] = AdaKV(budget)
        methods[f"HybridKV-device@{budget}"] = HybridKV(budget)
        methods[f"HybridKV-host@{budget}"] = HybridKV(budget, store="host")
    rows = measure(model, inputs, methods, args.new_tokens, args.repeats, on_row=print)
    write_results(rows, args.out, {"benchmark": "memory_speed", "repeats": args.repeats,
                                   "model": TINY_VL_DESCRIPTION})
    plot(rows, f"{args.out}.png")
    print_table(rows, COLUMNS)


if __name__ == "__main__":
    main()
