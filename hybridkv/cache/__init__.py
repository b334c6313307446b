"""KV storage: per-head variable-length layers and byte accounting."""

from hybridkv.cache.compressed_layer import CompressedLayer
from hybridkv.cache.memory import held_bytes

__all__ = ["CompressedLayer", "held_bytes"]
