"""Accuracy of every method x budget on the bundled tiny VLM's test split: single-image cell
questions (colour, shape, count) and the multi-image visual needle at 4, 8 and 16 images
(144-576 visual tokens). Same as ``hybridkv eval --model tiny-vlm --task visual-...``; writes
``results/multimodal_<protocol>.{jsonl,csv,json,md,png}`` (resumable).

The answers are one word, so the answer's position must read the compressed cache: under the
default protocol ``answer-after`` the images and the question are compressed and the assistant
header is fed after; ``question-after`` compresses the images alone (see
:mod:`hybridkv.data.visual_eval`).

Prompts are short (about 60 tokens for one image, 620 for 16), so the baselines' observation
window is set to 16 tokens, which covers the question; kvpress's default of 64 would be the
whole budget (every SnapKV-family method would keep only the newest tokens). HybridKV-offline
and SparseMM use the bundled head profile.

    python benchmarks/multimodal.py [--per-kind 50] [--protocol answer-after] [--threads 1]
"""

import argparse

from hybridkv.cli import main
from hybridkv.models.tiny_vlm import ASSET_DIR

WINDOWED = ("SnapKV", "AdaKV", "PyramidKV", "SparseMM")
METHODS = ("StreamingLLM", "H2O", *(f"{m}:window_size=16" for m in WINDOWED), "Quest", "HybridKV", "HybridKV-offline")

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-kind", default="50")
    parser.add_argument("--protocol", default="answer-after", choices=["answer-after", "question-after"])
    parser.add_argument("--threads", default="1")
    parser.add_argument("--profile", default=str(ASSET_DIR / "profile.json"))
    args = parser.parse_args()
    main(["--threads", args.threads, "eval", "--model", "tiny-vlm", "--task", "visual-cell_colour",
          "visual-cell_shape", "visual-count", "visual-needle", "--images", "4", "8", "16",
          "--per-kind", args.per_kind, "--protocol", args.protocol, "--methods", *METHODS,
          "--budgets", "0.05", "0.1", "0.2", "0.4", "--max-new-tokens", "2", "--profile", args.profile,
          "--out", f"results/multimodal_{args.protocol}"])
