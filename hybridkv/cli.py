"""``hybridkv`` command line: profile, eval, generate (and demo / bench where available)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
VISUAL_TASKS = ("visual-needle", "visual-cell_colour", "visual-cell_shape", "visual-count")
VISUAL_MODELS = ("tiny-vlm", "coder-vlm")
"""The project's VLMs (hybridkv.models.visual_models), named here so --help does not import torch."""


def _placement(args: argparse.Namespace) -> dict:
    """``dtype=`` / ``device=`` keyword arguments of the loaders from ``--dtype`` / ``--device``."""
    from hybridkv.device import DTYPES, resolve_device

    return {"dtype": DTYPES[args.dtype], "device": resolve_device(args.device)}


def _no_weights(args: argparse.Namespace) -> None:
    """A clear error for ``--weights`` with a text model (its weights are what ``--model`` names)."""
    if args.weights is not None:
        raise SystemExit(f"--weights applies to {' and '.join(VISUAL_MODELS)}; a text model's weights are what "
                         f"--model names (a known name or a checkpoint path), not {args.model!r} with --weights")


def _add_weights(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--weights", help="tiny-vlm / coder-vlm: their trained weights from this directory instead of "
                        "the bundled ones (what scripts/train_tiny_vlm.py or scripts/train_coder_vlm.py --out wrote)")


def _add_placement(parser: argparse.ArgumentParser) -> None:
    from hybridkv.device import DTYPES

    parser.add_argument("--dtype", default="float32", choices=list(DTYPES))
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (auto: CUDA when available)")


def _text_tasks(tokenizer, kinds: list[str], lengths: list[int], depths: list[float], seeds: list[int],
                protocol: str = "answer-after"):
    """Text tasks of every kind, length, depth and seed; ``ruler-<task>`` kinds (``ruler``: all of them)
    are RULER's, which have no depth parameter and take ``protocol`` (question-aware or -agnostic)."""
    from hybridkv.data.ruler import RULER_TASKS, ruler_tasks
    from hybridkv.data.text_tasks import TextTaskBuilder

    ruler = [t for k in kinds if k.startswith("ruler") for t in (RULER_TASKS if k == "ruler" else [k.removeprefix("ruler-")])]
    plain = [k for k in kinds if not k.startswith("ruler")]
    tasks = []
    if plain and protocol != "answer-after":
        raise SystemExit(f"--protocol {protocol} applies to RULER and visual tasks, not to {', '.join(plain)}")
    if plain:
        builder = TextTaskBuilder(tokenizer)
        tasks += [getattr(builder, kind)(length, depth, seed)
                  for kind in plain for length in lengths for depth in depths for seed in seeds]
    if ruler:
        tasks += ruler_tasks(tokenizer, list(dict.fromkeys(ruler)), lengths, seeds, protocol)
    return tasks


def cmd_profile(args: argparse.Namespace) -> None:
    """Stage 1 on calibration prompts (seeds disjoint from eval's), JSON + PNG heat map."""
    from hybridkv.plots import profile_heatmap
    from hybridkv.profile import profile_heads

    if args.model in VISUAL_MODELS:  # visual questions of the validation split
        from hybridkv.data.visual_eval import visual_tasks
        from hybridkv.models.visual_models import visual_model

        model, tokenizer, processor = visual_model(args.model).load(**_placement(args), weights=args.weights)
        kinds = ["needle", "cell_colour"] if args.model == "tiny-vlm" else ["needle"]  # coder-vlm: multi-image only
        tasks = visual_tasks(tokenizer, processor, kinds, -(-args.samples // len(kinds)), "validation",
                             model=args.model)
        samples = [t.inputs() for t in tasks]
    else:
        from hybridkv.models.loading import load_model

        _no_weights(args)
        model, tokenizer = load_model(args.model, **_placement(args))
        depths = [(i + 0.5) / args.samples for i in range(args.samples)]
        samples = [{**t.inputs(), "query_tokens": t.query_tokens}
                   for t in _text_tasks(tokenizer, ["needle"], [args.length], depths, [1000])]
    profile = profile_heads(model, samples, decode_tokens=args.decode_tokens, threshold=args.threshold,
                            max_dynamic_share=args.max_dynamic_share, progress=True)
    profile.save(args.out)
    png = args.png or str(Path(args.out).with_suffix(".png"))
    profile_heatmap(profile, png, title=f"{args.model}: staticness ({profile.dynamic_share:.0%} dynamic)")
    print(f"wrote {args.out} and {png}: {profile.dynamic_share:.0%} of KV heads dynamic")


def cmd_eval(args: argparse.Namespace) -> None:
    """Methods x budgets on long-text retrieval or visual questions (resumable), table + CSV/JSON + PNG."""
    from hybridkv import evaluation
    from hybridkv.head_profile import HeadProfile
    from hybridkv.methods.registry import needs_profile

    visual = [t for t in args.task if t in VISUAL_TASKS]
    if visual and len(visual) != len(args.task):
        raise SystemExit("mix of text and visual tasks: run them as two evals")
    if visual:
        from hybridkv.data.visual_eval import visual_tasks
        from hybridkv.models.visual_models import visual_model

        if args.model not in VISUAL_MODELS:
            raise SystemExit(f"visual tasks run on the project's VLMs: --model {' or '.join(VISUAL_MODELS)}")
        model, tokenizer, processor = visual_model(args.model).load(**_placement(args), weights=args.weights)
        kinds = [t.replace("visual-", "") for t in visual]
        tasks = visual_tasks(tokenizer, processor, kinds, args.per_kind, args.split, num_images=args.images or None,
                             protocol=args.protocol, model=args.model)
        kinds = list(dict.fromkeys(t.kind for t in tasks))
        kinds += ["needle-*"] if sum(k.startswith("needle-") for k in kinds) > 1 else []
        title = f"visual question accuracy ({args.protocol})"
    else:
        from hybridkv.models.loading import load_model

        _no_weights(args)
        if args.split != "test":
            raise SystemExit("--split applies to visual tasks; text tasks choose their prompts with --seeds")
        model, tokenizer = load_model(args.model, **_placement(args))
        tasks = _text_tasks(tokenizer, args.task, args.lengths, args.depths, args.seeds, args.protocol)
        kinds = list(dict.fromkeys(t.kind for t in tasks))
        title = "retrieval accuracy" + ("" if args.protocol == "answer-after" else f" ({args.protocol})")
    profile = HeadProfile.load(args.profile) if args.profile else None
    methods = [m for m in args.methods if profile is not None or not needs_profile(m)]
    skipped = sorted(set(args.methods) - set(methods))
    if skipped:
        print(f"no --profile: skipping {', '.join(skipped)}", file=sys.stderr)
    # rows of other weights are another model's: they never resume into (or mix with) the bundled model's rows
    name = args.model if args.weights is None else f"{args.model}@{args.weights}"
    evaluation.run_table(model, tokenizer, name, tasks, args.out, methods, args.budgets, args.peers, profile,
                         args.max_new_tokens, title, kinds)


def cmd_generate(args: argparse.Namespace) -> None:
    """One prompt through one method; prints the answer and the cache report."""
    import torch

    from hybridkv.head_profile import HeadProfile
    from hybridkv.methods import make_method
    from hybridkv.models.loading import load_model

    model, tokenizer = load_model(args.model, **_placement(args))
    method = make_method(args.method, args.budget, HeadProfile.load(args.profile) if args.profile else None)
    inputs = tokenizer(args.prompt, return_tensors="pt").to(model.device)
    with torch.inference_mode(), method.apply(model, query_tokens=args.query_tokens):
        out = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False)
    print(tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
    report = method.report.to_dict()
    print(json.dumps({k: report[k] for k in ("method", "prompt_tokens", "full_kv_bytes", "resident_kv_bytes",
                                             "offloaded_kv_bytes", "compression_ratio", "attended_tokens_per_step")}))


def cmd_demo(args: argparse.Namespace) -> None:
    """Full cache vs HybridKV on a multi-image prompt (bundled tiny VLM by default)."""
    from hybridkv.demo import run_demo

    run_demo(args.model, args.image, args.prompt, args.budget, args.images, args.seed, args.new_tokens, args.out,
             args.profile, **_placement(args))


def cmd_bench(args: argparse.Namespace) -> None:
    """Decode speed / memory against context length (see hybridkv.speed)."""
    from hybridkv.speed import run

    run(args)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    from hybridkv.data.ruler import RULER_TASKS
    from hybridkv.evaluation import BUDGETS, METHODS
    from hybridkv.models.pretrained import KNOWN_MODELS

    parser = argparse.ArgumentParser(prog="hybridkv", description="Per-head compressed KV caches inside transformers.")
    parser.add_argument("--threads", type=int, help="torch CPU threads (1 avoids spin-waiting when cores are shared)")
    sub = parser.add_subparsers(dest="command", required=True)
    known = f"a known name ({', '.join(KNOWN_MODELS)}) or a transformers checkpoint path"

    p = sub.add_parser("demo", help="full cache vs HybridKV side by side on a multi-image prompt (offline default)")
    p.add_argument("--model", help="a Qwen2.5-VL checkpoint (default: the bundled tiny VLM)")
    p.add_argument("--image", nargs="+", help="your own image files (default: a generated visual needle task)")
    p.add_argument("--prompt", help="your own question")
    p.add_argument("--budget", type=float, default=0.1)
    p.add_argument("--images", type=int, default=16, help="images of the generated needle task")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--new-tokens", type=int, default=4)
    p.add_argument("--profile", help="head profile JSON (default: the bundled model's, else online)")
    p.add_argument("--out", default="hybridkv_demo.png", help="kept-token picture")
    _add_placement(p)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("profile", help="classify KV heads static/dynamic (stage 1) -> JSON + PNG heat map")
    p.add_argument("--model", required=True, help=f"{known}, or tiny-vlm / coder-vlm (visual calibration)")
    p.add_argument("--out", required=True, help="profile JSON path")
    p.add_argument("--png", help="heat map path (default: next to --out)")
    p.add_argument("--samples", type=int, default=4)
    p.add_argument("--length", type=int, default=1024, help="calibration prompt length (tokens)")
    p.add_argument("--decode-tokens", type=int, default=8)
    p.add_argument("--threshold", type=float, default=0.5)
    p.add_argument("--max-dynamic-share", type=float, default=0.5)
    _add_weights(p)
    _add_placement(p)
    p.set_defaults(func=cmd_profile)

    p = sub.add_parser("eval", help="methods x budgets on long-text retrieval or visual questions (resumable)")
    p.add_argument("--model", required=True, help=known)
    p.add_argument("--task", nargs="+", default=["needle", "multi_key"],
                   choices=["needle", "multi_key", "ruler", *(f"ruler-{t}" for t in RULER_TASKS), *VISUAL_TASKS],
                   help="text tasks (real-weights models; ruler: every RULER task, see docs/ruler.md) or visual-* tasks "
                   "(--model tiny-vlm or coder-vlm)")
    p.add_argument("--per-kind", type=int, default=20, help="visual tasks: questions per task kind")
    p.add_argument("--split", default="test", choices=["test", "validation"],
                   help="visual tasks: the split the questions come from (validation: for tuning, never reported "
                   "as a result)")
    p.add_argument("--images", nargs="+", type=int, help="visual-needle: images per prompt, one set of tasks "
                   "per count (default: drawn per question, 4-16)")
    p.add_argument("--protocol", default="answer-after", choices=["answer-after", "question-after"],
                   help="visual and RULER tasks: what is fed after compression (answer-after: the question is "
                   "compressed as the text prior, only the assistant header of a visual prompt is fed after; "
                   "question-after: the question is fed after, images or context alone are compressed)")
    p.add_argument("--lengths", nargs="+", type=int, default=[1024, 2048, 4096])
    p.add_argument("--depths", nargs="+", type=float, default=[0.1, 0.5, 0.9], help="needle / multi_key (RULER draws its own)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--methods", nargs="*", default=list(METHODS), help="hybridkv methods (none: the full cache "
                   "and --peers alone)")
    p.add_argument("--budgets", nargs="+", type=float, default=list(BUDGETS))
    p.add_argument("--peers", nargs="*", default=[], help="kvpress presses, e.g. kvpress:SnapKV (needs hybridkv[bench])")
    p.add_argument("--profile", help="head profile JSON (enables SparseMM and HybridKV-offline)")
    p.add_argument("--max-new-tokens", type=int, default=8, help="answer length (RULER tasks set their own)")
    _add_weights(p)
    _add_placement(p)
    p.add_argument("--out", default="results/quality")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("bench", help="decode ms/token, KV bytes and peak memory vs context length, with the roofline")
    from hybridkv.speed import add_arguments

    add_arguments(p)
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("generate", help="answer one text prompt under one method and print its cache report")
    p.add_argument("--model", required=True, help=known)
    p.add_argument("--prompt", required=True)
    p.add_argument("--method", default="HybridKV")
    p.add_argument("--budget", type=float, default=0.1)
    p.add_argument("--profile")
    p.add_argument("--query-tokens", type=int)
    p.add_argument("--max-new-tokens", type=int, default=32)
    _add_placement(p)
    p.set_defaults(func=cmd_generate)
    return parser


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``hybridkv`` command."""
    args = build_parser().parse_args(argv)
    from transformers.utils import logging

    logging.disable_progress_bar()  # weight-loading bars drown the command's own output
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    args.func(args)


if __name__ == "__main__":
    main()
