"""KV bytes held and decode speed of the cache engine on a ~4k-token prompt (tiny Qwen2.5-VL).

Runs the plain model (transformers' DynamicCache), FullKV, SnapKV and AdaKV at budgets 0.1
and 0.25 side by side in one process on the same prompt (prefill, then each greedy decoding
step timed alone; the median over steps and repeats is reported), and writes
``results/engine_memory.{csv,json}``. ``padded_layout_bytes`` is what a padded per-head layout
(every head of a layer padded to its longest head) would hold for the same kept entries: the
measurement behind the flattened layout of :class:`hybridkv.cache.CompressedLayer`.

    python benchmarks/engine_memory.py [--images 4 --grid 64 --new-tokens 32 --repeats 3]
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from transformers import DynamicCache

from hybridkv import AdaKV, FullKV, SnapKV
from hybridkv.models.tiny import tiny_model, visual_inputs


def timed_decode(model, inputs, new_tokens: int) -> tuple[float, list[float], DynamicCache]:
    """Prefill once, then greedy steps timed one by one (positions from the cache's length).

    Returns:
        (prefill seconds, per-step decode milliseconds, the cache).
    """
    cache = DynamicCache()
    with torch.inference_mode():
        start = time.perf_counter()
        out = model(**inputs, past_key_values=cache, use_cache=True)
        prefill = time.perf_counter() - start
        steps = []
        for _ in range(new_tokens):
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            start = time.perf_counter()
            out = model(input_ids=token, past_key_values=cache, use_cache=True)
            steps.append(1000 * (time.perf_counter() - start))
    return prefill, steps, cache


def padded_bytes(report, head_dim: int, element: int) -> int:
    """Bytes of a padded layout: per layer, kv_heads x the longest head's prompt entries (K and V)."""
    return sum(len(heads) * max(heads) * head_dim * 2 * element for heads in report.head_budgets)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--grid", type=int, default=64, help="patches per image side (grid^2/4 tokens per image)")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="results/engine_memory")
    args = parser.parse_args()

    model = tiny_model("qwen2_5_vl", hidden_size=256, layers=4, heads=8, kv_heads=2)
    inputs = visual_inputs(images=args.images, grid=args.grid)
    prompt = inputs["input_ids"].shape[1]
    head_dim = 256 // 8
    runs = [("plain DynamicCache", None, None), ("FullKV", FullKV(), 1.0)]
    for budget in (0.1, 0.25):
        runs += [(f"SnapKV@{budget}", SnapKV(budget), budget), (f"AdaKV@{budget}", AdaKV(budget), budget)]
    rows = []
    for name, method, budget in runs:
        prefills, steps = [], []
        for _ in range(args.repeats):
            if method is None:
                prefill, ms, cache = timed_decode(model, inputs, args.new_tokens)
            else:
                with method.apply(model):
                    prefill, ms, cache = timed_decode(model, inputs, args.new_tokens)
            prefills.append(prefill)
            steps += ms
        if method is None:
            held = sum(l.keys.untyped_storage().nbytes() + l.values.untyped_storage().nbytes() for l in cache.layers)
            padded = held
        else:
            held = method.report.resident_kv_bytes
            padded = padded_bytes(method.report, head_dim, 4)
        rows.append({
            "method": name,
            "budget": budget,
            "prompt_tokens": prompt,
            "kv_bytes_held": held,
            "padded_layout_bytes": padded,
            "prefill_s": round(statistics.median(prefills), 3),
            "decode_ms_per_token": round(statistics.median(steps), 2),
        })
        print(rows[-1], flush=True)
    full = rows[0]["kv_bytes_held"]
    for row in rows:
        row["ratio_vs_full"] = round(full / row["kv_bytes_held"], 2)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{out}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    meta = {"machine": f"{platform.machine()} {torch.get_num_threads()} threads, {platform.processor() or 'cpu'}",
            "torch": torch.__version__, "new_tokens": args.new_tokens, "repeats": args.repeats}
    Path(f"{out}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"{'method':<20}{'bytes held':>12}{'padded':>12}{'x less':>8}{'prefill s':>10}{'ms/token':>10}")
    for r in rows:
        print(f"{r['method']:<20}{r['kv_bytes_held']:>12}{r['padded_layout_bytes']:>12}{r['ratio_vs_full']:>8}"
              f"{r['prefill_s']:>10}{r['decode_ms_per_token']:>10}")


if __name__ == "__main__":
    main()
