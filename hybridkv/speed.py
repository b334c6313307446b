"""Decode speed against context length, ops per decoding step, prefill peak memory, and the roofline.

For each context length the prompt's KV is built once and every method compresses it
(``Engine.cache_from_prefill``), so a 32k context costs one prefill, not one per method. By
default the captured prefill is *synthetic* (random queries, keys and values of the model's
exact shapes): decoding time depends on shapes and budgets, not on values, and it makes 32k
contexts affordable on a CPU. Decoding runs through ``model.generate()`` with every step
stamped by a stopping criterion (:mod:`hybridkv.step_timer`); the figure is the median step.
Methods are interleaved and every (method, context) is measured in ``rounds`` rounds, the
faster median kept (shared machines). One further step per method runs under
``torch.profiler``: the aten ops of a decoding step per layer, and the host synchronisations
(``aten::item`` / ``aten::_local_scalar_dense``), which must be 0.

The roofline: a decoding step reads every weight once and the KV it attends, so the ideal
speedup of a method over the full cache is
``(weight_bytes + full_kv_bytes) / (weight_bytes + attended_kv_bytes)``; the achieved speedup is
the ratio of measured median step times.

Prefill memory (:func:`prefill_peak`): a real prefill of random tokens whose last
``question_tokens`` are the question (the text prior of HybridKV), peak memory above the
start (CUDA: the allocator's peak; CPU: sampled RSS), plain full cache against HybridKV.
"""

from __future__ import annotations

import statistics
import threading
import time

import psutil
import torch
from torch.profiler import ProfilerActivity, profile
from transformers import DynamicCache

from hybridkv.bench import print_table, write_results
from hybridkv.device import DTYPES, device_name, now, resolve_device
from hybridkv.harness import PrefillCapture
from hybridkv.methods import H2O, REGISTRY, FullKV, HybridKV, SnapKV
from hybridkv.methods.base import Method
from hybridkv.methods.registry import needs_profile
from hybridkv.models.architectures import model_spec
from hybridkv.step_timer import timed_generate

SETTINGS = {
    "7b-shaped": "Qwen2.5-VL-7B text dimensions (hidden 3584, 28 heads, 4 KV heads, MLP 18944), --layers layers",
    "deep": "28 layers with Qwen2.5-VL-7B's attention (hidden 3584, 28 heads, 4 KV heads, head_dim 128), MLP 1024",
    "llama24": "24-layer Llama, hidden 512, 4 MHA heads of 128, MLP 1376",
    "qwen2.5-coder-1.5b": "Qwen2.5-Coder-1.5B real weights (28 layers, 12 heads, 2 KV heads)",
}
QUERY_TOKENS = 32
"""Trailing tokens of a synthetic prompt that form its question."""


def memory_bandwidth_gbs(device: torch.device, megabytes: int = 512, repeats: int = 5) -> float:
    """Copy bandwidth of ``device`` in GB/s (read + write bytes / median copy time)."""
    src = torch.ones(megabytes * 2**20 // 4, device=device)
    dst = torch.empty_like(src)
    times = []
    for _ in range(repeats):
        start = now(device)
        dst.copy_(src)
        times.append(now(device) - start)
    return 2 * src.numel() * 4 / statistics.median(times) / 1e9


def build_model(setting: str, layers: int, dtype: torch.dtype, device: torch.device) -> tuple[torch.nn.Module, object]:
    """(model, tokenizer or None) of a ``--setting`` (random weights, vocabulary 2048, but the real model)."""
    if setting == "qwen2.5-coder-1.5b":
        from hybridkv.models.pretrained import load_pretrained

        model, tokenizer = load_pretrained(setting, dtype)
        return model.to(device).eval(), tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    if setting == "llama24":
        config = LlamaConfig(hidden_size=512, intermediate_size=1376, num_hidden_layers=layers or 24,
                             num_attention_heads=4, num_key_value_heads=4, vocab_size=2048,
                             max_position_embeddings=131072)
        cls = LlamaForCausalLM
    else:
        deep = setting == "deep"
        config = Qwen2Config(hidden_size=3584, intermediate_size=1024 if deep else 18944,
                             num_hidden_layers=layers or (28 if deep else 2), num_attention_heads=28,
                             num_key_value_heads=4, vocab_size=2048, max_position_embeddings=131072,
                             tie_word_embeddings=False)
        cls = Qwen2ForCausalLM
    config._attn_implementation = "sdpa"
    return cls(config).to(dtype=dtype, device=device).eval(), None


def synthetic_capture(model: torch.nn.Module, context: int, query_tokens: int = QUERY_TOKENS,
                      seed: int = 0) -> PrefillCapture:
    """A captured prefill of ``context`` random tokens with random (Hq/Hkv, L, D) tensors.

    Queries are one random row per head broadcast over positions (a stride-0 view: no memory).
    """
    spec = model_spec(model)
    dtype, device = model.dtype, model.device
    gen = torch.Generator().manual_seed(seed)
    layers = []
    for _ in range(spec.num_layers):
        q = torch.randn(spec.num_heads, 1, spec.head_dim, generator=gen).to(device, dtype).expand(-1, context, -1)
        k = torch.randn(spec.num_kv_heads, context, spec.head_dim, generator=gen).to(device, dtype)
        v = torch.randn(spec.num_kv_heads, context, spec.head_dim, generator=gen).to(device, dtype)
        layers.append((q, k, v))
    ids = torch.randint(3, 1000, (1, context), generator=gen).to(device)
    vocab = model.get_output_embeddings().weight.shape[0]
    return PrefillCapture(ids, query_tokens, layers, spec.head_dim**-0.5, torch.zeros(vocab, device=device))


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


def _cache_for(model: torch.nn.Module, capture: PrefillCapture, engine) -> DynamicCache:
    """The prompt's cache: compressed by ``engine``'s method, or a plain DynamicCache (None)."""
    if engine is not None:
        return engine.cache_from_prefill(capture)
    cache = DynamicCache()
    for idx, (_, k, v) in enumerate(capture.layers):
        cache.update(k[None], v[None], idx)
    return cache


def forward_ops(model: torch.nn.Module, **inputs) -> tuple[int, int]:
    """(aten ops, host synchronisations) of one ``model(**inputs)`` under ``torch.profiler``."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if model.device.type == "cuda" else [])
    with torch.inference_mode(), profile(activities=activities) as prof:
        model(**inputs)
    events = prof.key_averages()
    ops = sum(e.count for e in events if e.key.startswith("aten::"))
    syncs = sum(e.count for e in events if e.key in ("aten::item", "aten::_local_scalar_dense"))
    return ops, syncs


def _ops_per_layer(model: torch.nn.Module, cache: DynamicCache, layers: int) -> tuple[float, int]:
    """(aten ops of one decoding step per layer, host synchronisations in it)."""
    token = torch.ones(1, 1, dtype=torch.long, device=model.device)
    ops, syncs = forward_ops(model, input_ids=token, past_key_values=cache, use_cache=True)
    return ops / layers, syncs


def measure_method(model: torch.nn.Module, capture: PrefillCapture, method: Method | None, steps: int,
                   warmup: int, compile: bool = False) -> dict:
    """One timed run of ``method`` (None: plain DynamicCache) on a captured prompt: ``warmup``
    steps (compilation included) then ``steps`` stamped steps, then one profiled step."""
    spec = model_spec(model)
    ids = capture.input_ids
    inputs = {"input_ids": torch.cat([ids, ids[:, -1:]], dim=1)}
    inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    if method is None:
        run = timed_generate(model, inputs, 1 + warmup + steps, cache=_cache_for(model, capture, None))
        ops, syncs = _ops_per_layer(model, run.cache, spec.num_layers)
        held = sum(layer.keys.untyped_storage().nbytes() + layer.values.untyped_storage().nbytes()
                   for layer in run.cache.layers)
        attended = float(ids.shape[1])
    else:
        with torch.inference_mode(), method.apply(model, query_tokens=capture.query_tokens, compile=compile) as engine:
            run = timed_generate(model, inputs, 1 + warmup + steps, cache=_cache_for(model, capture, engine))
            ops, syncs = _ops_per_layer(model, run.cache, spec.num_layers)
            report = engine.report
        held = report.resident_kv_bytes + report.offloaded_kv_bytes
        attended = report.attended_tokens_per_step
    return {"decode_ms_per_token": round(statistics.median(run.step_ms[warmup:]), 2), "kv_bytes_held": held,
            "attended_tokens_per_step": round(attended, 1), "aten_ops_per_layer_step": round(ops, 1),
            "host_syncs_per_step": syncs}


def methods_for(budgets: list[float], compiled: bool) -> dict[str, tuple[Method | None, bool]]:
    """Name -> (method, compiled) of the speed table: the plain cache, then every registered method
    that needs no head profile (SparseMM does; its per-head budgets decode like AdaKV's) at each
    budget, HybridKV also with the host store, and with ``compiled`` SnapKV's and HybridKV's
    compiled steps."""
    methods: dict = {"plain DynamicCache": (None, False), "FullKV": (FullKV(), False)}
    for budget in budgets:
        for name in sorted(REGISTRY):
            if name != "FullKV" and not needs_profile(name):
                methods[f"{name}@{budget}"] = (REGISTRY[name](budget), False)
        methods[f"HybridKV-host@{budget}"] = (HybridKV(budget, store="host"), False)
        if compiled:
            methods |= {f"SnapKV@{budget}+compile": (SnapKV(budget), True),
                        f"HybridKV@{budget}+compile": (HybridKV(budget), True)}
    return methods


def decode_speed(model: torch.nn.Module, capture: PrefillCapture, methods: dict, steps: int = 16, warmup: int = 3,
                 rounds: int = 2, progress=None) -> list[dict]:
    """Median decode ms/token of every method on one captured prefill, methods interleaved over
    ``rounds`` rounds (the faster round is kept), with bytes held, ops, roofline and speedups.

    ``speedup_vs_dynamic`` is against transformers' DynamicCache, ``speedup_vs_fullkv`` against
    our uncompressed engine (``FullKV``, same attention kernel); ``vs_snapkv`` divides a
    method's step by SnapKV's at the same budget (and compilation).
    """
    spec = model_spec(model)
    element = model.dtype.itemsize
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    per_token = spec.num_layers * spec.num_kv_heads * spec.head_dim * 2 * element
    context = capture.input_ids.shape[1]
    best: dict[str, dict] = {}
    for _ in range(rounds):
        for name, (method, compiled) in methods.items():
            row = measure_method(model, capture, method, steps, warmup, compiled)
            if name not in best or row["decode_ms_per_token"] < best[name]["decode_ms_per_token"]:
                best[name] = row
            if progress is not None:
                progress(name, row)
    rows = []
    for name, (method, compiled) in methods.items():
        row = {"method": name, "budget": getattr(method, "budget", 1.0), "compiled": compiled, "context": context,
               **best[name], "weight_bytes": weight_bytes}
        row["attended_kv_bytes"] = int(row["attended_tokens_per_step"] * per_token)
        rows.append(row)
    by_name = {r["method"]: r for r in rows}
    full = by_name["FullKV"]
    dynamic = by_name.get("plain DynamicCache", full)
    for row in rows:
        ms = row["decode_ms_per_token"]
        row["speedup_vs_dynamic"] = round(dynamic["decode_ms_per_token"] / ms, 3)
        row["speedup_vs_fullkv"] = round(full["decode_ms_per_token"] / ms, 3)
        row["roofline_speedup"] = round((weight_bytes + full["attended_kv_bytes"])
                                        / (weight_bytes + row["attended_kv_bytes"]), 3)
        row["roofline_fraction_vs_fullkv"] = round(row["speedup_vs_fullkv"] / row["roofline_speedup"], 3)
        snap = by_name.get(f"SnapKV@{row['budget']}" + ("+compile" if row["compiled"] else ""))
        if snap is not None:
            row["vs_snapkv"] = round(ms / snap["decode_ms_per_token"], 3)
            row["ops_vs_snapkv"] = round(row["aten_ops_per_layer_step"] / snap["aten_ops_per_layer_step"], 3)
    return rows


def prefill_peak(model: torch.nn.Module, context: int, question_tokens: int, method: Method | None) -> dict:
    """Prefill seconds and peak memory above the start of a real prompt of random tokens whose last
    ``question_tokens`` are the question, under ``method`` (None: plain full cache)."""
    device = model.device
    ids = torch.randint(3, 1000, (1, context), generator=torch.Generator().manual_seed(0)).to(device)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "logits_to_keep": 1}
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    with PeakRSS() as rss, torch.inference_mode():
        start = now(device)
        if method is None:
            model(**inputs, past_key_values=DynamicCache(), use_cache=True)
        else:
            with method.apply(model, query_tokens=question_tokens):
                model(**inputs, past_key_values=DynamicCache(), use_cache=True)
        seconds = now(device) - start
    peak = torch.cuda.max_memory_allocated(device) - base if device.type == "cuda" else rss.peak
    return {"context": context, "question_tokens": question_tokens, "prefill_s": round(seconds, 2),
            "prefill_peak_bytes": peak, "peak_source": "cuda allocator" if device.type == "cuda" else "RSS"}


COLUMNS = ["context", "method", "decode_ms_per_token", "speedup_vs_fullkv", "speedup_vs_dynamic", "vs_snapkv",
           "roofline_speedup", "roofline_fraction_vs_fullkv", "aten_ops_per_layer_step", "ops_vs_snapkv",
           "host_syncs_per_step", "kv_bytes_held", "attended_tokens_per_step"]
PREFILL_COLUMNS = ["context", "question_tokens", "method", "prefill_s", "prefill_peak_bytes", "peak_vs_full"]


def plot(rows: list[dict], path: str, title: str) -> None:
    """Decode ms/token against context, one line per method."""
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
    ax.set(xscale="log", xlabel="context tokens", ylabel="decode ms/token (median, inside generate)", title=title)
    ax.legend(fontsize=6, ncol=3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def add_arguments(parser) -> None:
    """The speed benchmark's options (shared by ``benchmarks/speed.py`` and ``hybridkv bench``)."""
    parser.add_argument("--setting", default="deep", choices=list(SETTINGS))
    parser.add_argument("--layers", type=int, default=0, help="layers of a random stack (0: the setting's)")
    parser.add_argument("--contexts", nargs="+", type=int, default=[2048, 8192, 32768])
    parser.add_argument("--budgets", nargs="+", type=float, default=[0.1])
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds; the faster median is kept")
    parser.add_argument("--compile", action="store_true", help="also the compiled decoding step (SnapKV, HybridKV)")
    parser.add_argument("--only", nargs="+", help="only these method names of the table")
    parser.add_argument("--full-attention-max", type=int, default=8192,
                        help="longest context at which H2O (column sums of the whole attention matrix) is run")
    parser.add_argument("--dtype", default="float32", choices=list(DTYPES))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--prefill-contexts", nargs="*", type=int, default=[],
                        help="also measure prefill peak memory, plain vs HybridKV, at these contexts")
    parser.add_argument("--question-tokens", type=int, default=4096, help="question length of the prefill prompts")
    parser.add_argument("--prefill-layers", type=int, default=0, help="layers of the prefill model (0: the setting's)")
    parser.add_argument("--throughput", action="store_true", help="largest batch under --kv-limit-gib (see throughput)")
    parser.add_argument("--kv-limit-gib", type=float, default=1.0)
    parser.add_argument("--out", default=None)


def run(args) -> list[dict]:
    """Run the benchmark described by parsed :func:`add_arguments` options; write CSV/JSON/PNG."""
    if args.throughput:
        from hybridkv.throughput import run_throughput

        return run_throughput(args)
    dtype, device = DTYPES[args.dtype], resolve_device(args.device)
    model, _ = build_model(args.setting, args.layers, dtype, device)
    bandwidth = memory_bandwidth_gbs(device)
    where = device_name(device)
    print(f"{SETTINGS[args.setting]}; {where}, {args.dtype}; copy bandwidth {bandwidth:.1f} GB/s", flush=True)
    methods = methods_for(args.budgets, args.compile)
    if args.only:
        methods = {k: v for k, v in methods.items() if k in args.only or k == "FullKV"}
    rows = []
    for context in args.contexts:
        capture = synthetic_capture(model, context)
        report = lambda name, row, context=context: print(f"  {context} {name}: {row}", flush=True)  # noqa: E731
        here = {k: v for k, v in methods.items() if context <= args.full_attention_max or not isinstance(v[0], H2O)}
        if len(here) < len(methods):
            print(f"  {context}: H2O skipped (its scores are the whole {context}x{context} attention per head; "
                  f"--full-attention-max {args.full_attention_max})", flush=True)
        for row in decode_speed(model, capture, here, args.steps, args.warmup, args.rounds, progress=report):
            rows.append({"phase": "decode", **row})
        del capture
    if args.prefill_contexts:
        prefill_model = model if not args.prefill_layers else build_model(args.setting, args.prefill_layers, dtype, device)[0]
        for context in args.prefill_contexts:
            plain = prefill_peak(prefill_model, context, args.question_tokens, None)
            hybrid = prefill_peak(prefill_model, context, args.question_tokens, HybridKV(0.1))
            for name, row in (("plain DynamicCache", plain), ("HybridKV@0.1", hybrid)):
                rows.append({"phase": "prefill", "method": name, **row,
                             "peak_vs_full": round(row["prefill_peak_bytes"] / max(1, plain["prefill_peak_bytes"]), 3)})
                print(rows[-1], flush=True)
    out = args.out or f"results/speed_{args.setting}"
    write_results(rows, out, {"benchmark": "speed", "setting": args.setting, "description": SETTINGS[args.setting],
                              "layers": args.layers, "dtype": args.dtype, "device": where, "steps": args.steps,
                              "rounds": args.rounds, "memory_bandwidth_gbs": round(bandwidth, 1)})
    plot(rows, f"{out}.png", f"{args.setting}: decode ms/token ({args.dtype}, {where})")
    print_table([r for r in rows if r["phase"] == "decode"], COLUMNS)
    print_table([r for r in rows if r["phase"] == "prefill"], PREFILL_COLUMNS)
    return rows
