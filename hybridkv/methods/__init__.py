"""KV methods: one file each, all with the same ``budget=`` / ``apply(model)`` / ``report`` interface."""

from hybridkv.methods.adakv import AdaKV
from hybridkv.methods.base import Method
from hybridkv.methods.full_kv import FullKV
from hybridkv.methods.h2o import H2O
from hybridkv.methods.hybridkv import HybridKV
from hybridkv.methods.pyramidkv import PyramidKV
from hybridkv.methods.quest import Quest
from hybridkv.methods.snapkv import SnapKV
from hybridkv.methods.sparsemm import SparseMM
from hybridkv.methods.streaming_llm import StreamingLLM

__all__ = ["H2O", "AdaKV", "FullKV", "HybridKV", "Method", "PyramidKV", "Quest", "SnapKV", "SparseMM", "StreamingLLM"]
