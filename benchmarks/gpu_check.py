"""The GPU check in one command: bf16 exactness on every supported architecture, every method,
the demo and the deep decode benchmark on a CUDA device, into one results file.

    python benchmarks/gpu_check.py                 # CUDA (refuses without one)
    python benchmarks/gpu_check.py --device cpu    # the same checks on the CPU (a dry run)

Writes ``results/gpu_check.json`` with the device named. Sized to finish within 5 minutes on a
data-centre GPU: tiny random models for exactness, 2k-8k contexts and 8 steps for speed.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
import traceback
from pathlib import Path

import torch

from hybridkv.device import device_name, resolve_device
from hybridkv.methods import REGISTRY, FullKV, HybridKV, SnapKV, make_method
from hybridkv.methods.registry import needs_profile
from hybridkv.models.tiny import TINY_ARCHITECTURES, family_inputs, text_inputs, tiny_model, visual_inputs

KW = {"max_new_tokens": 8, "do_sample": False, "return_dict_in_generate": True, "output_logits": True}


def prompt(model_type: str, model: torch.nn.Module) -> dict:
    """A multi-image prompt for a vision family, a text prompt otherwise."""
    if model_type in ("qwen2_5_vl", "qwen2_vl"):
        return visual_inputs(images=3, grid=8)
    if model_type in ("qwen3_vl", "llava_onevision", "internvl"):
        return family_inputs(model.config, "multi_image")
    return text_inputs(160)


def on(inputs: dict, device: torch.device, dtype: torch.dtype) -> dict:
    return {k: v.to(device, dtype if v.is_floating_point() else v.dtype) for k, v in inputs.items()}


def exactness(device: torch.device) -> list[dict]:
    """bf16 at budget 1.0: FullKV, SnapKV and HybridKV give the tokens of plain bf16 generate();
    every registered method runs at 0.3 and its report counts what it holds."""
    rows = []
    for model_type in TINY_ARCHITECTURES:
        model = tiny_model(model_type, dtype=torch.bfloat16).to(device)
        inputs = on(prompt(model_type, model), device, torch.bfloat16)
        ref = model.generate(**inputs, **KW)
        for method in (FullKV(), SnapKV(1.0), HybridKV(1.0)):
            with method.apply(model):
                out = model.generate(**inputs, **KW)
            diff = max((a.float() - b.float()).abs().max().item() for a, b in zip(out.logits, ref.logits))
            rows.append({"model": model_type, "method": type(method).__name__, "budget": 1.0,
                         "tokens_equal": bool(torch.equal(out.sequences, ref.sequences)), "max_logit_diff": diff})
        for name in sorted(REGISTRY):
            if needs_profile(name):
                continue
            method = make_method(name, 0.3)
            with method.apply(model, query_tokens=16 if model_type in ("qwen2", "qwen3", "llama") else None):
                out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
            report = method.report
            rows.append({"model": model_type, "method": name, "budget": 0.3, "runs": out.shape[1] > 0,
                         "compression_ratio": round(report.compression_ratio, 2)})
        print(f"exactness {model_type}: {[r for r in rows if r['model'] == model_type and r['budget'] == 1.0]}",
              flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", default="results/gpu_check.json")
    parser.add_argument("--checks", nargs="+", default=["exactness_bf16", "demo", "deep_decode"])
    args = parser.parse_args()
    device = resolve_device(args.device)
    result = {"device": device_name(device), "torch": torch.__version__, "host": platform.node(), "checks": {}}
    start = time.perf_counter()
    checks = {"exactness_bf16": lambda: exactness(device), "demo": lambda: demo(device),
              "deep_decode": lambda: deep(device)}
    for name in args.checks:
        check = checks[name]
        began = time.perf_counter()
        try:
            result["checks"][name] = {"ok": True, "rows": check()}
        except Exception:  # one failing check must not hide the others' results
            result["checks"][name] = {"ok": False, "error": traceback.format_exc()}
        result["checks"][name]["seconds"] = round(time.perf_counter() - began, 1)
        print(f"{name}: {result['checks'][name]['ok']} in {result['checks'][name]['seconds']} s", flush=True)
    result["seconds"] = round(time.perf_counter() - start, 1)
    rows = result["checks"].get("exactness_bf16", {}).get("rows", [])
    result["all_exact"] = bool(rows) and all(r.get("tokens_equal", True) for r in rows)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}: device {result['device']}, all exact: {result['all_exact']}, {result['seconds']} s")


def demo(device: torch.device) -> list[dict]:
    """``hybridkv demo`` on the device in bf16."""
    from hybridkv.demo import run_demo

    full, hybrid = run_demo(dtype=torch.bfloat16, device=device, out="results/gpu_check_demo.png")
    return [{"method": run.name, "answer": run.answer, "ms_per_token": round(run.ms_per_token, 2),
             "compression_ratio": round(run.report.compression_ratio, 2)} for run in (full, hybrid)]


def deep(device: torch.device) -> list[dict]:
    """``hybridkv bench --setting deep`` at 2k and 8k, bf16, eager and compiled."""
    from hybridkv.speed import add_arguments, run

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--setting", "deep", "--contexts", "2048", "8192", "--steps", "8", "--rounds", "1",
                              "--dtype", "bfloat16", "--device", str(device), "--compile",
                              "--only", "plain DynamicCache", "SnapKV@0.1", "HybridKV@0.1", "SnapKV@0.1+compile",
                              "HybridKV@0.1+compile", "--out", "results/gpu_check_deep"])
    return run(args)


if __name__ == "__main__":
    main()
