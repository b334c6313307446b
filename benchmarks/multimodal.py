"""Accuracy of every method x budget on the bundled tiny VLM's test split: single-image cell
questions and the multi-image visual needle (4-16 images). Same as
``hybridkv eval --model tiny-vlm --task visual-...``; writes ``results/multimodal.{jsonl,csv,json,md,png}``.

    python benchmarks/multimodal.py [--per-kind 20] [--threads 1]
"""

import argparse

from hybridkv.cli import main

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-kind", default="20")
    parser.add_argument("--threads", default="1")
    parser.add_argument("--profile", default=None)
    args = parser.parse_args()
    profile = ["--profile", args.profile] if args.profile else []
    main(["--threads", args.threads, "eval", "--model", "tiny-vlm", "--task", "visual-cell_colour",
          "visual-cell_shape", "visual-needle", "--per-kind", args.per_kind, "--max-new-tokens", "2",
          "--out", "results/multimodal", *profile])
