"""Decode speed against context length, with this machine's memory bandwidth and the roofline.

For each context length the prompt's KV is built once and every method compresses it
(``Engine.cache_from_prefill``), so a 32k context costs one prefill, not one per method. By
default the captured prefill is *synthetic* (random queries, keys and values of the model's
exact shapes): decoding time depends on shapes and budgets, not on values, and it makes 32k-64k
contexts affordable on a CPU. Prefill itself (time and peak memory) is measured on real
prompts by :func:`prefill_profile`.

The roofline: a decoding step reads every weight once and the KV it attends, so the ideal
speedup of a method over the full cache is
``(weight_bytes + full_kv_bytes) / (weight_bytes + attended_kv_bytes)``; the achieved speedup is
the ratio of measured median step times.
"""

from __future__ import annotations

import statistics
import threading
import time

import psutil
import torch
from transformers import DynamicCache

from hybridkv.bench import dynamic_cache_bytes, print_table, write_results
from hybridkv.harness import PrefillCapture
from hybridkv.methods import AdaKV, FullKV, HybridKV, Quest, SnapKV
from hybridkv.methods.base import Method
from hybridkv.models.architectures import model_spec


def memory_bandwidth_gbs(megabytes: int = 512, repeats: int = 5) -> float:
    """Copy bandwidth of this machine in GB/s (read + write bytes / median copy time)."""
    src = torch.ones(megabytes * 2**20 // 4)
    dst = torch.empty_like(src)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - start)
    return 2 * src.numel() * 4 / statistics.median(times) / 1e9


def synthetic_capture(model: torch.nn.Module, context: int, query_tokens: int = 32, seed: int = 0) -> PrefillCapture:
    """A captured prefill of ``context`` random tokens with random (Hq/Hkv, L, D) tensors.

    Queries are one random row per head broadcast over positions (a stride-0 view: no memory).
    """
    spec = model_spec(model)
    dtype = next(model.parameters()).dtype
    gen = torch.Generator().manual_seed(seed)
    layers = []
    for _ in range(spec.num_layers):
        q = torch.randn(spec.num_heads, 1, spec.head_dim, generator=gen).to(dtype).expand(-1, context, -1)
        k = torch.randn(spec.num_kv_heads, context, spec.head_dim, generator=gen).to(dtype)
        v = torch.randn(spec.num_kv_heads, context, spec.head_dim, generator=gen).to(dtype)
        layers.append((q, k, v))
    ids = torch.randint(1, 1000, (1, context), generator=gen)
    vocab = model.get_output_embeddings().weight.shape[0]
    return PrefillCapture(ids, query_tokens, layers, spec.head_dim**-0.5, torch.zeros(vocab))


class PeakRSS:
    """Context manager sampling this process's RSS; ``.peak`` bytes above the RSS at entry."""

    def __init__(self, interval: float = 0.005) -> None:
        self.interval, self.peak = interval, 0
        self._process = psutil.Process()

    def __enter__(self) -> PeakRSS:
        self._base = self._process.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._process.memory_info().rss - self._base)
            time.sleep(self.interval)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._process.memory_info().rss - self._base)


def _steps(model, cache, steps: int) -> list[float]:
    token = torch.tensor([[1]])
    times = []
    with torch.inference_mode():
        for _ in range(steps):
            start = time.perf_counter()
            model(input_ids=token, past_key_values=cache, use_cache=True)
            times.append(1000 * (time.perf_counter() - start))
    return times


def decode_speed(model: torch.nn.Module, capture: PrefillCapture, methods: dict[str, Method | None],
                 steps: int = 16, warmup: int = 2) -> list[dict]:
    """Median decode ms/token of every method on one captured prefill.

    ``None`` is the plain model with a transformers ``DynamicCache`` holding the whole prompt.
    Returns rows with bytes held, attended tokens, the roofline prediction and the speedups:
    ``speedup_vs_full`` against the first full-cache row (the plain ``DynamicCache`` when it
    runs), ``speedup_vs_fullkv`` against our uncompressed engine (``FullKV``, same attention
    kernel); ``roofline_fraction*`` divide them by the ideal ``roofline_speedup``.
    """
    spec = model_spec(model)
    element = next(model.parameters()).element_size()
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    per_token = spec.num_layers * spec.num_kv_heads * spec.head_dim * 2 * element
    context = capture.input_ids.shape[1]
    rows = []
    for name, method in methods.items():
        with PeakRSS() as peak:
            if method is None:
                cache = DynamicCache()
                for idx, (_, k, v) in enumerate(capture.layers):
                    cache.update(k[None], v[None], idx)
                times = _steps(model, cache, warmup + steps)[warmup:]
                held, attended = context * per_token, float(context)
            else:
                with torch.inference_mode(), method.apply(model, query_tokens=capture.query_tokens) as engine:
                    cache = engine.cache_from_prefill(capture)
                    times = _steps(model, cache, warmup + steps)[warmup:]
                report = method.report
                held = report.resident_kv_bytes + report.offloaded_kv_bytes
                attended = report.attended_tokens_per_step
        del cache
        rows.append({"method": name, "budget": getattr(method, "budget", 1.0), "context": context,
                     "decode_ms_per_token": round(statistics.median(times), 2), "kv_bytes_held": held,
                     "attended_tokens_per_step": round(attended, 1), "peak_rss_delta_bytes": peak.peak,
                     "weight_bytes": weight_bytes, "attended_kv_bytes": int(attended * per_token)})
    base = next((r for r in rows if r["budget"] == 1.0), rows[0])
    engine_full = next((r for r in rows if r["method"] == "FullKV"), base)
    for row in rows:
        row["speedup_vs_full"] = round(base["decode_ms_per_token"] / row["decode_ms_per_token"], 3)
        row["roofline_speedup"] = round((weight_bytes + base["attended_kv_bytes"])
                                        / (weight_bytes + row["attended_kv_bytes"]), 3)
        row["roofline_fraction"] = round(row["speedup_vs_full"] / row["roofline_speedup"], 3)
        row["speedup_vs_fullkv"] = round(engine_full["decode_ms_per_token"] / row["decode_ms_per_token"], 3)
        row["roofline_fraction_vs_fullkv"] = round(row["speedup_vs_fullkv"] / row["roofline_speedup"], 3)
    return rows


def prefill_profile(model: torch.nn.Module, inputs: dict, method: Method | None) -> dict:
    """Prefill seconds and peak RSS above the start for one real prompt under ``method``."""
    with PeakRSS() as peak, torch.inference_mode():
        start = time.perf_counter()
        if method is None:
            model(**inputs, past_key_values=DynamicCache(), use_cache=True)
        else:
            with method.apply(model):
                model(**inputs, past_key_values=DynamicCache(), use_cache=True)
        seconds = time.perf_counter() - start
    return {"prefill_s": round(seconds, 2), "prefill_peak_rss_delta_bytes": peak.peak}


PREFILL_COLUMNS = ["context", "method", "prefill_s", "prefill_peak_rss_delta_bytes"]
COLUMNS = ["context", "method", "decode_ms_per_token", "speedup_vs_full", "speedup_vs_fullkv", "roofline_speedup",
           "roofline_fraction", "roofline_fraction_vs_fullkv", "kv_bytes_held", "attended_tokens_per_step",
           "peak_rss_delta_bytes"]


def seven_b_shaped(layers: int, dtype: torch.dtype) -> torch.nn.Module:
    """Qwen2.5-VL-7B text dimensions, ``layers`` layers, random weights, vocabulary 2048."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(hidden_size=3584, intermediate_size=18944, num_hidden_layers=layers, num_attention_heads=28,
                         num_key_value_heads=4, vocab_size=2048, max_position_embeddings=131072,
                         tie_word_embeddings=False)
    config._attn_implementation = "sdpa"
    return Qwen2ForCausalLM(config).to(dtype).eval()


def methods_for(budgets: list[float]) -> dict:
    methods: dict = {"plain DynamicCache": None, "FullKV": FullKV()}
    for budget in budgets:
        methods |= {f"SnapKV@{budget}": SnapKV(budget), f"AdaKV@{budget}": AdaKV(budget),
                    f"Quest@{budget}": Quest(budget), f"HybridKV-device@{budget}": HybridKV(budget),
                    f"HybridKV-host@{budget}": HybridKV(budget, store="host")}
    return methods


def kvpress_row(model, tokenizer, context: int, budget: float, steps: int) -> dict:
    """SnapKVPress (kvpress 0.5.5) on a real prompt: prefill under the press, then timed steps."""
    from kvpress import SnapKVPress
    from transformers import DynamicCache

    from hybridkv.data.text_tasks import TextTaskBuilder

    task = TextTaskBuilder(tokenizer).needle(context, 0.5, 0)
    cache = DynamicCache()
    times = []
    with torch.inference_mode(), SnapKVPress(compression_ratio=1 - budget)(model):
        model(**task.inputs(), past_key_values=cache, use_cache=True)
        token = torch.tensor([[1]])
        for _ in range(steps + 2):
            start = time.perf_counter()
            model(input_ids=token, past_key_values=cache, use_cache=True)
            times.append(1000 * (time.perf_counter() - start))
    held = dynamic_cache_bytes(cache)
    times = sorted(times[2:])
    return {"phase": "decode", "method": f"kvpress:SnapKV@{budget}", "budget": budget, "context": task.input_ids.shape[1],
            "decode_ms_per_token": round(times[len(times) // 2], 2), "kv_bytes_held": held,
            "attended_tokens_per_step": cache.get_seq_length()}


def plot(rows: list[dict], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    rows = [r for r in rows if r["phase"] == "decode" and not r["method"].startswith("kvpress")]
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = sorted((r for r in rows if r["method"] == method), key=lambda r: r["context"])
        style = "k--" if method == "plain DynamicCache" else ("o-" if "HybridKV" in method else ".-")
        ax.plot([r["context"] for r in mine], [r["decode_ms_per_token"] for r in mine], style, label=method,
                lw=2 if "HybridKV" in method else 1)
    ax.set(xscale="log", xlabel="context tokens", ylabel="decode ms/token (median)", title=title)
    ax.legend(fontsize=6, ncol=3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def add_arguments(parser) -> None:
    """The speed benchmark's options (shared by ``benchmarks/speed.py`` and ``hybridkv bench``)."""
    parser.add_argument("--setting", default="7b-shaped", choices=["7b-shaped", "qwen2.5-coder-1.5b"])
    parser.add_argument("--layers", type=int, default=2, help="layers of the 7b-shaped stack")
    parser.add_argument("--contexts", nargs="+", type=int, default=[2048, 4096, 8192, 16384, 32768])
    parser.add_argument("--budgets", nargs="+", type=float, default=[0.05, 0.1, 0.2])
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--kvpress", action="store_true", help="also SnapKVPress at the smallest context (real prefill)")
    parser.add_argument("--prefill-max", type=int, default=4096,
                        help="also time real prefills (plain vs HybridKV@0.1, peak memory) up to this context")
    parser.add_argument("--out", default=None)


def run(args) -> list[dict]:
    """Run the benchmark described by parsed :func:`add_arguments` options; write CSV/JSON/PNG."""
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    tokenizer = None
    if args.setting == "7b-shaped":
        model = seven_b_shaped(args.layers, dtype)
    else:
        from hybridkv.models.pretrained import load_pretrained

        model, tokenizer = load_pretrained(args.setting, dtype)
    bandwidth = memory_bandwidth_gbs()
    print(f"memory bandwidth (copy): {bandwidth:.1f} GB/s; threads: {torch.get_num_threads()}", flush=True)
    rows = []
    for context in args.contexts:
        capture = synthetic_capture(model, context)
        for row in decode_speed(model, capture, methods_for(args.budgets), steps=args.steps):
            rows.append({"phase": "decode", **row})
            print(row, flush=True)
        del capture
    for context in [c for c in args.contexts if c <= args.prefill_max]:
        inputs = {"input_ids": torch.randint(1, 1000, (1, context), generator=torch.Generator().manual_seed(0))}
        for name, method in {"plain DynamicCache": None, "HybridKV@0.1": HybridKV(0.1)}.items():
            rows.append({"method": name, "context": context, "phase": "prefill", **prefill_profile(model, inputs, method)})
            print(rows[-1], flush=True)
    if args.kvpress and tokenizer is not None:
        for budget in args.budgets:
            rows.append(kvpress_row(model, tokenizer, min(args.contexts), budget, args.steps))
            print(rows[-1], flush=True)
    out = args.out or f"results/speed_{args.setting}"
    write_results(rows, out, {"benchmark": "speed", "setting": args.setting, "layers": args.layers,
                              "dtype": args.dtype, "steps": args.steps, "memory_bandwidth_gbs": round(bandwidth, 1)})
    plot(rows, f"{out}.png", f"{args.setting}: decode ms/token ({args.dtype}, {torch.get_num_threads()} threads)")
    print_table([r for r in rows if r["phase"] == "decode"], COLUMNS)
    print_table([r for r in rows if r["phase"] == "prefill"], PREFILL_COLUMNS)
    return rows
