"""KV storage: per-row variable-length layers, chunk pools for retrieval, byte accounting."""

from hybridkv.cache.chunk_pool import ChunkPool, HeadChunks, merge_heads
from hybridkv.cache.compressed_layer import CompressedLayer, ForwardBias
from hybridkv.cache.memory import held_bytes

__all__ = ["ChunkPool", "CompressedLayer", "ForwardBias", "HeadChunks", "held_bytes", "merge_heads"]
