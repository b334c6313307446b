"""One decoder layer's KV storage with a different number of kept tokens per KV head.

Layout (chosen by measurement, see ``benchmarks/engine_memory.py``): the compressed prompt is
stored *flattened*: every kept (head, position) entry is one row of ``prefix_keys`` /
``prefix_values`` with shape ``(N, head_dim)``, and ``prefix_heads`` (N,) says which KV head a
row belongs to. The bytes held are therefore the sum of the per-head budgets, not
``kv_heads x`` the largest one as a padded layout would hold.

Row order: when every head keeps the same number of entries, rows are sorted by (head,
position), so the prefix is also a ``(kv_heads, n, head_dim)`` view. Otherwise each head's
entries are cut into *tiles* of ``tile_rows`` consecutive rows: all heads' whole tiles come
first (head by head, so tile ``t`` is rows ``[t * tile_rows, (t + 1) * tile_rows)`` of one
head, ``tile_heads[t]``), then the fewer than ``tile_rows`` leftover rows of every head (the
*remainder*). Attention reads the tiles as a ``(tiles, tile_rows, head_dim)`` view and gives
each tile only its own head's queries, so no work is spent on other heads' entries, and
nothing is padded.
Tokens that were never compressed (the prompt during prefill, then every generated token)
live in a rectangular ``recent`` block ``(1, kv_heads, capacity, head_dim)`` that is shared by
all heads and grows by preallocated steps of 1.5x, so a decoding step copies one token, not the
whole cache.

Contract with transformers (see ``shared/notes/transformers-5.2-cache.md``):
``get_seq_length()`` returns the tokens *seen* (prompt + generated), never the tokens kept, so
positions and M-RoPE deltas continue at the original position; ``get_mask_sizes`` returns
(stored + q_len, seen - stored). Keys are stored after RoPE, so dropping tokens needs no
re-rotation.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import CacheLayerMixin

_MIN_RECENT_CAPACITY = 8
TILE_ROWS = 64
"""Default rows per prefix tile (a batched product over 64-row tiles measured ~3x faster than
one masked product over all heads' rows, on 12k rows of a 28-query-head / 4-KV-head layer)."""


class CompressedLayer(CacheLayerMixin):
    """Per-head variable-length KV storage for one layer (batch size 1).

    Args:
        kv_heads: KV heads of the layer.
        tile_rows: rows per prefix tile (see the module docstring).

    Attributes:
        prefix_keys / prefix_values: (N, head_dim) kept prompt entries (order: module docstring).
        prefix_heads: (N,) int32 KV-head index of each entry.
        tile_heads: (tiles,) long KV head of each prefix tile (empty when ``uniform``); the
            tiles are the first ``tiles * tile_rows`` rows, the remainder the rest.
        prefix_positions: (N,) int32 prompt position of each entry.
        head_lengths: per-head kept prompt entries, list of ``kv_heads`` ints.
        uniform: every head kept the same (non-zero) number of prompt entries, so the prefix
            is also a (kv_heads, n, head_dim) view.
        recent_keys / recent_values: (1, kv_heads, capacity, head_dim); the first ``recent_len``
            slots are valid and hold the tokens at positions ``[seen - recent_len, seen)``.
        retriever: optional object with ``retrieved(query)`` adding per-step retrieved
            entries (dynamic heads, see :class:`~hybridkv.retrieval.ChunkRetriever`); ``None``
            for eviction-only methods.
        observer: optional callable ``observer(query, layer)`` run at every decoding step
            before attention (head profiling reads decode-time attention through it).
    """

    is_sliding = False

    def __init__(self, kv_heads: int, tile_rows: int = TILE_ROWS) -> None:
        super().__init__()
        self.kv_heads, self.tile_rows = kv_heads, tile_rows
        self.seen = 0
        self.compressed = False
        self.prefix_keys: torch.Tensor | None = None
        self.prefix_values: torch.Tensor | None = None
        self.prefix_heads: torch.Tensor | None = None
        self.prefix_positions: torch.Tensor | None = None
        self.head_lengths: list[int] = []
        self.uniform = False
        self.tile_heads = torch.empty(0, dtype=torch.long)
        self.recent_keys: torch.Tensor | None = None
        self.recent_values: torch.Tensor | None = None
        self.recent_len = 0
        self.retriever: Any = None
        self.observer: Any = None

    # ----------------------------------------------------------------- transformers API
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Record dtype/device from the first keys (1, kv_heads, q_len, head_dim)."""
        if key_states.shape[0] != 1:
            raise ValueError("hybridkv supports batch size 1 only for now; call generate() once per prompt.")
        self.dtype, self.device = key_states.dtype, key_states.device
        self.head_dim = key_states.shape[-1]
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, cache_kwargs: dict[str, Any] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append new tokens (1, kv_heads, q_len, head_dim) to the recent block of every head.

        Returns the valid recent keys and values (1, kv_heads, recent_len, head_dim); the
        hybridkv attention function reads the whole layer (prefix + recent) itself.
        """
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        q_len = key_states.shape[-2]
        needed = self.recent_len + q_len
        if self.recent_keys is None or needed > self.recent_keys.shape[-2]:
            self._grow_recent(needed)
        self.recent_keys[:, :, self.recent_len : needed] = key_states
        self.recent_values[:, :, self.recent_len : needed] = value_states
        self.recent_len = needed
        self.seen += q_len
        self.keys, self.values = self.recent()
        return self.keys, self.values

    def get_seq_length(self) -> int:
        """Tokens seen so far (prompt + generated), not tokens kept."""
        return self.seen

    def get_mask_sizes(self, cache_position: torch.Tensor) -> tuple[int, int]:
        """(stored + q_len, seen - stored) for the longest head, as a sliding-window layer reports."""
        stored = self.recent_len + (max(self.head_lengths) if self.head_lengths else 0)
        return stored + cache_position.shape[0], self.seen - stored

    def get_max_cache_shape(self) -> int:
        """No maximum length (grows like a DynamicLayer)."""
        return -1

    def reset(self) -> None:
        """Drop everything (a fresh prompt follows)."""
        self.__init__(self.kv_heads, self.tile_rows)

    # ----------------------------------------------------------------- hybridkv API
    def recent(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Valid recent keys and values, each (1, kv_heads, recent_len, head_dim) views."""
        return self.recent_keys[:, :, : self.recent_len], self.recent_values[:, :, : self.recent_len]

    def compress(self, keep: torch.Tensor) -> None:
        """Replace the uncompressed prompt by the kept entries of every head.

        Args:
            keep: (kv_heads, prompt_len) bool, which prompt positions each head keeps. The
                prompt must be the whole recent block (called once, at the end of prefill).
        """
        if self.compressed or keep.shape != (self.kv_heads, self.recent_len):
            raise RuntimeError(
                f"compress() expects a (kv_heads, prompt_len) = {(self.kv_heads, self.recent_len)} mask once per "
                f"prompt, got {tuple(keep.shape)} (compressed already: {self.compressed})."
            )
        heads, positions = keep.nonzero(as_tuple=True)  # sorted by head, then position
        lengths = keep.sum(dim=1)
        self.head_lengths = lengths.tolist()
        self.uniform = heads.numel() > 0 and len(set(self.head_lengths)) == 1
        if not self.uniform:  # whole tiles of every head first, then every head's leftover rows
            first = torch.cumsum(lengths, 0) - lengths  # (kv_heads,) first row of each head
            rank = torch.arange(heads.shape[0], device=heads.device) - first[heads]
            leftover = rank >= (lengths // self.tile_rows * self.tile_rows)[heads]
            order = torch.argsort(leftover.to(torch.int8), stable=True)
            heads, positions = heads[order], positions[order]
            self.tile_heads = torch.repeat_interleave(
                torch.arange(self.kv_heads, device=heads.device), lengths // self.tile_rows)
        keys, values = self.recent()
        self.prefix_keys = keys[0, heads, positions].contiguous()  # (N, head_dim)
        self.prefix_values = values[0, heads, positions].contiguous()
        self.prefix_heads = heads.to(torch.int32)
        self.prefix_positions = positions.to(torch.int32)
        self.recent_keys = self.recent_values = self.keys = self.values = None
        self.recent_len = 0
        self.compressed = True
        self._grow_recent(_MIN_RECENT_CAPACITY)

    def _grow_recent(self, needed: int) -> None:
        """Reallocate the recent block to at least ``needed`` slots, keeping its content.

        The prompt gets exactly its length (it is compressed right after prefill); after
        compression the block starts at a small capacity and grows 1.5x when full (amortised
        O(1) copies per generated token, at most a third of the block as slack).
        """
        if self.recent_keys is None:
            capacity = max(needed, _MIN_RECENT_CAPACITY) if self.compressed else needed
        else:
            capacity = max(needed, 3 * self.recent_keys.shape[-2] // 2)
        shape = (1, self.kv_heads, capacity, self.head_dim)
        new_k = torch.empty(shape, dtype=self.dtype, device=self.device)
        new_v = torch.empty(shape, dtype=self.dtype, device=self.device)
        if self.recent_len:
            new_k[:, :, : self.recent_len] = self.recent_keys[:, :, : self.recent_len]
            new_v[:, :, : self.recent_len] = self.recent_values[:, :, : self.recent_len]
        self.recent_keys, self.recent_values = new_k, new_v

    def stored_per_head(self) -> list[int]:
        """Prompt tokens each KV head holds in all tiers: kept entries plus its retrieval pool."""
        pooled = self.retriever.stored_per_head() if self.retriever is not None else [0] * self.kv_heads
        return [kept + extra for kept, extra in zip(self.head_lengths, pooled)]
