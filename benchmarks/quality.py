"""Methods x budgets on long-text retrieval with real pretrained weights, kvpress side by side.

The same as ``hybridkv eval`` (which see for every option); kept here beside the other
benchmarks. Example (the runs quoted in the issue notes):

    python benchmarks/quality.py --threads 1 --model smollm2-135m --lengths 1024 2048 \\
        --profile results/profiles/smollm2-135m.json --peers kvpress:SnapKV kvpress:AdaKV ...
"""

import sys

from hybridkv.cli import main

if __name__ == "__main__":
    args = sys.argv[1:]
    threads = args[:2] if args[:1] == ["--threads"] else []
    main([*threads, "eval", *args[len(threads):]])
