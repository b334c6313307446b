"""Side-by-side memory and decode-speed measurement of KV methods (used by ``benchmarks/`` and
``hybridkv bench``).

Every method runs on the same model and prompt in one process: ``generate()`` with every
decoding step stamped (:mod:`hybridkv.step_timer`); the median step time is reported. Bytes
held are counted from the cache's tensor storages.
"""

from __future__ import annotations

import csv
import json
import platform
import statistics
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import DynamicCache

from hybridkv.methods.base import Method
from hybridkv.step_timer import timed_generate


def dynamic_cache_bytes(cache: DynamicCache) -> int:
    """Bytes of keys and values a plain DynamicCache holds."""
    return sum(layer.keys.untyped_storage().nbytes() + layer.values.untyped_storage().nbytes() for layer in cache.layers)


def prompt_kv_bytes(head_budgets: list[list[int]], head_dim: int, element: int) -> tuple[int, int]:
    """Prompt K and V bytes of the kept entries in the flat layout (their sum over heads) and in a
    padded per-head layout (per layer, kv_heads x the longest head)."""
    flat = sum(sum(heads) for heads in head_budgets) * head_dim * 2 * element
    padded = sum(len(heads) * max(heads) for heads in head_budgets) * head_dim * 2 * element
    return flat, padded


def measure(
    model: torch.nn.Module,
    inputs: dict,
    methods: dict[str, Method | None],
    new_tokens: int = 32,
    repeats: int = 3,
    on_row: Callable[[dict], None] | None = None,
) -> list[dict]:
    """Measure every method (None = the plain model) on one prompt.

    Returns:
        One row per method: bytes held (resident, offloaded), the DynamicCache's bytes,
        the kept prompt KV in the flat and in a padded layout, attended tokens per step, median prefill seconds and decode
        ms/token, and the ratio of full to held bytes.
    """
    rows = []
    prompt = inputs["input_ids"].shape[1]
    for name, method in methods.items():
        prefills, steps = [], []
        for _ in range(repeats):
            if method is None:
                run = timed_generate(model, inputs, new_tokens)
                cache = run.cache
            else:
                with method.apply(model) as engine:
                    run = timed_generate(model, inputs, new_tokens)
                    head_dim, element = engine.layers[0].head_dim, engine.layers[0].dtype.itemsize
            prefills.append(run.prefill_s)
            steps += run.step_ms
        row = {"method": name, "budget": getattr(method, "budget", None), "prompt_tokens": prompt,
               "new_tokens": new_tokens}
        if method is None:
            held = dynamic_cache_bytes(cache)
            row.update(resident_kv_bytes=held, offloaded_kv_bytes=0, full_kv_bytes=held,
                       attended_tokens_per_step=cache.get_seq_length())
        else:
            report = method.report
            flat, padded = prompt_kv_bytes(report.head_budgets, head_dim, element)
            row.update(resident_kv_bytes=report.resident_kv_bytes, offloaded_kv_bytes=report.offloaded_kv_bytes,
                       full_kv_bytes=report.full_kv_bytes, prompt_kv_flat_bytes=flat, prompt_kv_padded_bytes=padded,
                       attended_tokens_per_step=round(report.attended_tokens_per_step, 1))
        row["x_less_kv"] = round(row["full_kv_bytes"] / (row["resident_kv_bytes"] + row["offloaded_kv_bytes"]), 2)
        row["prefill_s"] = round(statistics.median(prefills), 3)
        row["decode_ms_per_token"] = round(statistics.median(steps), 2)
        rows.append(row)
        if on_row is not None:
            on_row(row)
    return rows


TINY_VL_VOCAB = 2048
TINY_VL_DESCRIPTION = "tiny random qwen2_5_vl: 4 layers x 512, 8 heads, 4 kv heads, vocab 2048"


def add_tiny_vl_arguments(parser, out: str) -> None:
    """Options of the benchmarks that run one multi-image prompt on the tiny KV-bound Qwen2.5-VL."""
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--grid", type=int, default=64, help="patches per image side (grid^2/4 tokens per image)")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=out)


def tiny_vl_setting(images: int, grid: int) -> tuple[torch.nn.Module, dict]:
    """The tiny Qwen2.5-VL with a small vocabulary (the KV cache, not the output layer, dominates
    decoding) and a prompt of ``images`` random images of ``grid^2 / 4`` visual tokens each."""
    from hybridkv.models.tiny import tiny_model, visual_inputs

    model = tiny_model("qwen2_5_vl", hidden_size=512, layers=4, heads=8, kv_heads=4, vocab_size=TINY_VL_VOCAB)
    return model, visual_inputs(images=images, grid=grid, vocab_size=TINY_VL_VOCAB)


def machine() -> dict:
    """Where the figures come from."""
    return {"machine": platform.machine(), "processor": platform.processor() or "unknown",
            "threads": torch.get_num_threads(), "torch": torch.__version__,
            "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


def with_ext(out: str | Path, ext: str) -> Path:
    """``out`` + ``ext`` (``Path.with_suffix`` would eat ``.5b`` of ``results/quality_qwen2.5-coder-1.5b``)."""
    return Path(f"{out}{ext}")


def write_results(rows: list[dict], out: str | Path, meta: dict) -> None:
    """Write ``out``.csv and ``out``.json (rows plus ``meta`` and :func:`machine`)."""
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fields = list(dict.fromkeys(k for row in rows for k in row))
    with open(with_ext(out, ".csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    with_ext(out, ".json").write_text(json.dumps({"meta": {**meta, **machine()}, "rows": rows}, indent=2))


def print_table(rows: list[dict], columns: list[str]) -> None:
    """Print rows as an aligned text table (nothing for no rows)."""
    if not rows:
        return
    widths = [max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in columns]
    print("  ".join(c.rjust(w) for c, w in zip(columns, widths)))
    for row in rows:
        print("  ".join(str(row.get(c, "")).rjust(w) for c, w in zip(columns, widths)))
