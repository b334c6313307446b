"""KV bytes held and decode speed of the cache engine on a ~4k-token prompt (tiny Qwen2.5-VL).

Plain model (transformers' DynamicCache), FullKV, SnapKV and AdaKV at budgets 0.1 and 0.25,
side by side in one process on the same prompt; writes ``results/engine_memory.{csv,json}``.
``prompt_kv_flat_bytes`` / ``prompt_kv_padded_bytes`` are the kept prompt K and V in the
flattened layout of :class:`hybridkv.cache.CompressedLayer` and in a padded per-head layout
(every head of a layer padded to its longest head): the measurement behind the layout.

    python benchmarks/engine_memory.py [--images 4 --grid 64 --new-tokens 32 --repeats 3]
"""

from __future__ import annotations

import argparse

from hybridkv import AdaKV, FullKV, SnapKV
from hybridkv.bench import (
    TINY_VL_DESCRIPTION,
    add_tiny_vl_arguments,
    measure,
    print_table,
    tiny_vl_setting,
    write_results,
)

COLUMNS = ["method", "resident_kv_bytes", "prompt_kv_flat_bytes", "prompt_kv_padded_bytes", "x_less_kv",
           "attended_tokens_per_step",
           "prefill_s", "decode_ms_per_token"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_tiny_vl_arguments(parser, "results/engine_memory")
    args = parser.parse_args()
    model, inputs = tiny_vl_setting(args.images, args.grid)
    methods = {"plain DynamicCache": None, "FullKV": FullKV()}
    for budget in (0.1, 0.25):
        methods[f"SnapKV@{budget}"] = SnapKV(budget)
        methods[f"AdaKV@{budget}"] = AdaKV(budget)
    rows = measure(model, inputs, methods, args.new_tokens, args.repeats, on_row=print)
    write_results(rows, args.out, {"benchmark": "engine_memory", "model": TINY_VL_DESCRIPTION,
                                   "repeats": args.repeats})
    print_table(rows, COLUMNS)


if __name__ == "__main__":
    main()
