"""Accuracy of every method x budget on a project VLM's test split.

``--model tiny-vlm`` (default): the bundled 4-layer toy; single-image cell questions (colour,
shape, count) and the multi-image visual needle at 4, 8 and 16 images (144-576 visual tokens).
Prompts are short (about 60 tokens for one image, 620 for 16), so the baselines' observation
window is set to 16 tokens, which covers the question; kvpress's default of 64 would be the
whole budget (every SnapKV-family method would keep only the newest tokens). HybridKV-offline
and SparseMM use the bundled head profile.

``--model coder-vlm``: Qwen2.5-Coder-1.5B's pretrained decoder behind the trained vision path
(:mod:`hybridkv.models.coder_vlm`); the visual needle at 8, 16 and 32 images (2,056-8,224 visual
tokens, text under 5% of the prompt), in bfloat16; the methods keep their default windows;
HybridKV-offline and SparseMM use ``results/profiles/coder-vlm.json`` (made on the validation
split: ``hybridkv profile --model coder-vlm``). kvpress's presses run beside them at ``--peer-budget``
(each press prefills the prompt itself, so they are run at one budget; LLaVA-OneVision's 1-D
positions let the tail be fed after the press as kvpress's pipeline does).

Same as ``hybridkv eval --model <vlm> --task visual-...``; writes
``results/multimodal_<protocol>.*`` (tiny-vlm) or ``results/multimodal_coder-vlm_<protocol>.*``
(jsonl, csv, json, md, png; resumable). The answers are one word, so the answer's position must
read the compressed cache: under the default protocol ``answer-after`` the images and the
question are compressed and the assistant header is fed after; ``question-after`` compresses the
images alone (see :mod:`hybridkv.data.visual_eval`).

    python benchmarks/multimodal.py [--model tiny-vlm] [--per-kind 50] [--protocol answer-after] [--threads 1]
           [--images 8 16 32] [--peers kvpress:SnapKV ...] [--peer-budget 0.1] [--no-variants]
"""

import argparse

from hybridkv.cli import main
from hybridkv.evaluation import PEERS
from hybridkv.models.tiny_vlm import ASSET_DIR

WINDOWED = ("SnapKV", "AdaKV", "PyramidKV", "SparseMM")
TINY_METHODS = ("StreamingLLM", "H2O", *(f"{m}:window_size=16" for m in WINDOWED), "Quest", "HybridKV", "HybridKV-offline")
CODER_METHODS = ("StreamingLLM", "H2O", *WINDOWED, "Quest", "HybridKV", "HybridKV-offline")
VARIANTS = {
    ("tiny-vlm", "answer-after"): ("HybridKV:kernel_size=7",),
    ("coder-vlm", "answer-after"): ("HybridKV:kernel_size=7", "HybridKV:visual_kernel_size=15"),
    **{(model, "question-after"): ("HybridKV:question_free_prior=attention,kernel_size=7",
                                   "HybridKV:consensus_share=0.0", "HybridKV-offline:consensus_share=0.0",
                                   "HybridKV:derotate_share=0.0,consensus_share=0.0",
                                   "HybridKV-offline:derotate_share=0.0,consensus_share=0.0")
       for model in ("tiny-vlm", "coder-vlm")},
}
"""HybridKV variants run beside the default: text tokens pooled over 7 as visual ones (the default
before RULER's text needles asked for 15, docs/ruler.md; text competes by score when a budget
cannot hold it) and visual tokens pooled over 15 (rejected on the validation split,
docs/choices.md); with the images compressed before the question, the window's attention in
place of key diversity (with text pooled over 7, as it ran before the split into two widths),
each head's own key-diversity ranking alone (the default before RULER's tuning seeds chose the
model-wide ranking beside it), and key diversity ranked on the cached keys alone (the default
before those seeds chose the union with the keys' RoPE undone, docs/ruler.md)."""
BUDGETS = ("0.05", "0.1", "0.2", "0.4")

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-vlm", choices=["tiny-vlm", "coder-vlm"])
    parser.add_argument("--per-kind", help="test prompts per task kind (default: 50 tiny-vlm, 20 coder-vlm)")
    parser.add_argument("--protocol", default="answer-after", choices=["answer-after", "question-after"])
    parser.add_argument("--threads", default="1")
    parser.add_argument("--profile", help="head profile (default: the model's, see above)")
    parser.add_argument("--images", nargs="+", help="coder-vlm: images per needle prompt (default: 8 16 32)")
    parser.add_argument("--peers", nargs="*", default=list(PEERS), help="coder-vlm: kvpress presses")
    parser.add_argument("--peer-budget", default="0.1", help="coder-vlm: the budget kvpress's presses run at")
    parser.add_argument("--no-variants", action="store_true", help="run the default methods alone, not VARIANTS")
    args = parser.parse_args()
    if args.model == "tiny-vlm":
        tasks = ["visual-cell_colour", "visual-cell_shape", "visual-count", "visual-needle", "--images", "4", "8", "16"]
        methods, extra = TINY_METHODS, ["--per-kind", args.per_kind or "50", "--max-new-tokens", "2"]
        profile, out = args.profile or str(ASSET_DIR / "profile.json"), f"results/multimodal_{args.protocol}"
    else:
        tasks = ["visual-needle", "--images", *(args.images or ["8", "16", "32"])]
        methods = CODER_METHODS
        extra = ["--per-kind", args.per_kind or "20", "--dtype", "bfloat16", "--max-new-tokens", "3"]
        profile, out = args.profile or "results/profiles/coder-vlm.json", f"results/multimodal_coder-vlm_{args.protocol}"
    common = ["--threads", args.threads, "eval", "--model", args.model, "--task", *tasks, *extra, "--protocol",
              args.protocol, "--profile", profile, "--out", out]
    methods = (*methods, *(() if args.no_variants else VARIANTS.get((args.model, args.protocol), ())))
    main([*common, "--methods", *methods, "--budgets", *BUDGETS])
    if args.model == "coder-vlm" and args.peers:
        main([*common, "--methods", "--budgets", args.peer_budget, "--peers", *args.peers])
