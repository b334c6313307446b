#!/usr/bin/env bash
# Development set-up from nothing (README, .ci/run): .venv with the CPU torch these machines
# carry, transformers 5.2, the test tools and both harness extras (lm-eval, lmms-eval).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/pip install -q -c constraints/cpu.txt -e '.[test,lm-eval,lmms-eval]'
# lmms-eval requires torchvision. The only torchvision wheel a CPU-only machine gets from PyPI is
# built for PyTorch's CUDA wheel; beside the CPU torch build its operators fail to register
# ("operator torchvision::nms does not exist"), and transformers, which imports torchvision when
# it is installed, then fails to import. Neither hybridkv nor lmms-eval's text and image paths
# used here need it, so a torchvision that does not import is removed.
if ! .venv/bin/python -c "import torchvision" 2>/dev/null; then
    .venv/bin/pip uninstall -q -y torchvision
fi
