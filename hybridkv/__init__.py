"""hybridkv: per-head compressed KV caches (HybridKV and baselines) inside transformers."""

import hybridkv.attention  # noqa: F401  (registers the "hybridkv" attention implementation)
from hybridkv.cache import held_bytes
from hybridkv.head_profile import HeadProfile, ProfileMismatchError
from hybridkv.methods import H2O, AdaKV, FullKV, HybridKV, PyramidKV, Quest, SnapKV, SparseMM, StreamingLLM
from hybridkv.models.architectures import SUPPORTED_MODEL_TYPES, UnsupportedModelError
from hybridkv.profile import profile_heads
from hybridkv.report import CacheReport

__version__ = "0.1.0"
__all__ = [
    "H2O",
    "SUPPORTED_MODEL_TYPES",
    "AdaKV",
    "CacheReport",
    "FullKV",
    "HeadProfile",
    "HybridKV",
    "ProfileMismatchError",
    "PyramidKV",
    "Quest",
    "SnapKV",
    "SparseMM",
    "StreamingLLM",
    "UnsupportedModelError",
    "held_bytes",
    "profile_heads",
]
