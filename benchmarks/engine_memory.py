"""KV bytes held and decode speed of the cache engine on a ~4k-token prompt (tiny Qwen2.5-VL).

Plain model (transformers' DynamicCache), FullKV, SnapKV and AdaKV at budgets 0.1 and 0.25,
side by side in one process on the same prompt; writes ``results/engine_memory.{csv,json}``.
``padded_layout_bytes`` is what a padded per-head layout (every head of a layer padded to its
longest head) would hold for the same kept entries: the measurement behind the flattened
layout of :class:`hybridkv.cache.CompressedLayer`.

    python benchmarks/engine_memory.py [--images 4 --grid 64 --new-tokens 32 --repeats 3]
"""

from __future__ import annotations

import argparse

from hybridkv import AdaKV, FullKV, SnapKV
from hybridkv.bench import measure, print_table, write_results
from hybridkv.models.tiny import tiny_model, visual_inputs

COLUMNS = ["method", "resident_kv_bytes", "padded_layout_bytes", "x_less_kv", "attended_tokens_per_step",
           "prefill_s", "decode_ms_per_token"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--grid", type=int, default=64, help="patches per image side (grid^2/4 tokens per image)")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="results/engine_memory")
    args = parser.parse_args()

    vocab = 2048
    model = tiny_model("qwen2_5_vl", hidden_size=512, layers=4, heads=8, kv_heads=4, vocab_size=vocab)
    inputs = visual_inputs(images=args.images, grid=args.grid, vocab_size=vocab)
    methods = {"plain DynamicCache": None, "FullKV": FullKV()}
    for budget in (0.1, 0.25):
        methods[f"SnapKV@{budget}"] = SnapKV(budget)
        methods[f"AdaKV@{budget}"] = AdaKV(budget)
    rows = measure(model, inputs, methods, args.new_tokens, args.repeats, on_row=print)
    write_results(rows, args.out, {"benchmark": "engine_memory", "model": "tiny qwen2_5_vl 4x512, 8 heads, 4 kv heads",
                                   "repeats": args.repeats})
    print_table(rows, COLUMNS)


if __name__ == "__main__":
    main()
