"""KV methods: one file each, all with the same ``budget=`` / ``apply(model)`` / ``report`` interface.

Every module of this package is imported here, so a method that registers itself
(:func:`hybridkv.methods.registry.register`) in a new file is in :data:`REGISTRY` without any
other edit.
"""

import importlib
import pkgutil

from hybridkv.methods.adakv import AdaKV
from hybridkv.methods.base import Method
from hybridkv.methods.full_kv import FullKV
from hybridkv.methods.h2o import H2O
from hybridkv.methods.hybridkv import HybridKV
from hybridkv.methods.pyramidkv import PyramidKV
from hybridkv.methods.quest import Quest
from hybridkv.methods.registry import REGISTRY, make_method, register
from hybridkv.methods.snapkv import SnapKV
from hybridkv.methods.sparsemm import SparseMM
from hybridkv.methods.streaming_llm import StreamingLLM

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["REGISTRY", "AdaKV", "FullKV", "H2O", "HybridKV", "Method", "PyramidKV", "Quest", "SnapKV", "SparseMM",
           "StreamingLLM", "make_method", "register"]
