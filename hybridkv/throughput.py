"""Throughput at a fixed KV memory: the largest batch each method fits under a limit, and its
decoding tokens per second (``hybridkv bench --throughput``).

For each context length and method, one sequence's compressed cache is built from a captured
prefill (synthetic, as in :mod:`hybridkv.speed`), its resident bytes per sequence give the
largest batch under ``--kv-limit-gib``, the cache is repeated to that batch
(``batch_repeat_interleave``, as ``generate()`` expands a prompt), the bytes the batch really
holds are walked from its tensors (they must be under the limit), and ``generate()`` decodes
with every step stamped: tokens/s = batch / median step.
"""

from __future__ import annotations

import statistics

import torch
from transformers import DynamicCache

from hybridkv.bench import print_table, write_results
from hybridkv.cache import held_bytes
from hybridkv.device import DTYPES, device_name, resolve_device
from hybridkv.methods import FullKV, HybridKV, SnapKV
from hybridkv.methods.base import Method
from hybridkv.speed import SETTINGS, build_model, synthetic_capture
from hybridkv.step_timer import timed_generate

COLUMNS = ["context", "method", "kv_bytes_per_sequence", "batch", "kv_bytes_held", "decode_ms_per_step", "tokens_per_s",
           "sequences_vs_fullkv", "tokens_per_s_vs_fullkv"]


def _resident(cache: DynamicCache) -> int:
    """Device bytes of a cache's layers (ours or transformers')."""
    return sum(held_bytes(layer).get(layer.keys.device.type, 0) for layer in cache.layers)


def fit_and_decode(model: torch.nn.Module, capture, method: Method, limit: int, steps: int, warmup: int) -> dict:
    """Largest batch of ``method`` under ``limit`` resident KV bytes, and its decoding speed."""
    ids = capture.input_ids
    with torch.inference_mode(), method.apply(model, query_tokens=capture.query_tokens) as engine:
        one = engine.cache_from_prefill(capture)
        per_sequence = _resident(one)
        batch = limit // per_sequence
        row = {"method": f"{type(method).__name__}@{method.budget}", "context": ids.shape[1],
               "kv_bytes_per_sequence": per_sequence, "batch": batch}
        if batch == 0:
            return {**row, "kv_bytes_held": 0, "decode_ms_per_step": None, "tokens_per_s": 0.0}
        one.batch_repeat_interleave(batch)
        held = _resident(one)
        if held > limit:
            raise RuntimeError(f"{row['method']}: {batch} sequences hold {held} bytes, over the {limit}-byte limit.")
        prompt = torch.cat([ids, ids[:, -1:]], dim=1).expand(batch, -1)
        inputs = {"input_ids": prompt, "attention_mask": torch.ones_like(prompt)}
        run = timed_generate(model, inputs, 1 + warmup + steps, cache=one)
    ms = statistics.median(run.step_ms[warmup:])
    return {**row, "kv_bytes_held": held, "decode_ms_per_step": round(ms, 2), "tokens_per_s": round(1000 * batch / ms, 1)}


def plot(rows: list[dict], path: str, title: str) -> None:
    """Sequences served and tokens/s per method, one group of bars per context."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    contexts = sorted({r["context"] for r in rows})
    methods = list(dict.fromkeys(r["method"] for r in rows))
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    width = 0.8 / len(methods)
    for i, method in enumerate(methods):
        mine = {r["context"]: r for r in rows if r["method"] == method}
        x = [j + i * width for j in range(len(contexts))]
        axes[0].bar(x, [mine[c]["batch"] for c in contexts], width, label=method)
        axes[1].bar(x, [mine[c]["tokens_per_s"] for c in contexts], width, label=method)
    for ax, label in zip(axes, ("sequences under the KV limit", "decode tokens/s")):
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(contexts))], [str(c) for c in contexts])
        ax.set(xlabel="context tokens per sequence", ylabel=label, yscale="log")
    axes[0].legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_throughput(args) -> list[dict]:
    """The ``--throughput`` benchmark over ``--contexts`` for FullKV, SnapKV and HybridKV at ``--budgets``."""
    dtype, device = DTYPES[args.dtype], resolve_device(args.device)
    model, _ = build_model(args.setting, args.layers, dtype, device)
    limit = int(args.kv_limit_gib * 2**30)
    where = device_name(device)
    print(f"{SETTINGS[args.setting]}; {where}, {args.dtype}; KV limit {args.kv_limit_gib} GiB", flush=True)
    methods = [FullKV()] + [m for b in args.budgets for m in (SnapKV(b), HybridKV(b))]
    rows = []
    for context in args.contexts:
        capture = synthetic_capture(model, context)
        mine = [fit_and_decode(model, capture, method, limit, args.steps, args.warmup) for method in methods]
        full = mine[0]
        for row in mine:
            row["sequences_vs_fullkv"] = round(row["batch"] / max(1, full["batch"]), 2)
            row["tokens_per_s_vs_fullkv"] = round(row["tokens_per_s"] / max(1e-9, full["tokens_per_s"]), 2)
            print(row, flush=True)
        rows += mine
        del capture
    out = args.out or f"results/throughput_{args.setting}"
    write_results(rows, out, {"benchmark": "throughput", "setting": args.setting, "layers": args.layers,
                              "dtype": args.dtype, "device": where, "kv_limit_gib": args.kv_limit_gib,
                              "steps": args.steps})
    plot(rows, f"{out}.png", f"{args.setting}: {args.kv_limit_gib} GiB of KV ({args.dtype}, {where})")
    print_table(rows, COLUMNS)
    return rows
