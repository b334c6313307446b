"""One decoder layer's KV storage, where every (sequence, KV head) row keeps its own entries.

Layout (measured against the alternatives in ``docs/engine.md``): keys and values are one
rectangle per layer, ``(B, H, capacity, D)``, read in place by a single attention call.

* Columns ``[0, kept_width)`` are the **kept region**. Row ``(b, h)`` holds its kept entries
  first (in the order they were seen), then, for a head that retrieves chunks, its
  **retrieval slots** (rewritten at every decoding step by :class:`~hybridkv.cache.ChunkPool`),
  then unused columns up to ``kept_width``.
* Columns ``[kept_width, stored)`` are the **uncompressed region**: tokens seen since the last
  compression (the prompt during its prefill, generated tokens, a later turn), in the same
  columns for every row, so appending a token is one slice copy.
* ``bias`` ``(B, H, 1, capacity)`` is the additive attention mask in the keys' dtype: 0 where
  a column holds an entry the row attends, ``-inf`` elsewhere (unused and unwritten columns,
  padding), so attending the whole buffer is exact too (the compiled decoding step does).

Every row can hold a different number of entries; the bytes held are those of the rectangle,
so a layer whose heads keep very different numbers of tokens holds ``H x`` its longest head.
Unused columns hold zeros (finite keys under a ``-inf`` bias give exact zeros in the softmax).

Contract with transformers (``shared/notes/transformers-5.2-cache.md``): ``get_seq_length()``
is the number of tokens *seen*, never the number kept, so positions (and Qwen-VL's M-RoPE
deltas) continue at the original position. Keys are stored after RoPE: dropping tokens needs
no re-rotation.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import CacheLayerMixin

MIN_SPARE_COLUMNS = 8
"""Free uncompressed columns allocated after a compression (the region grows 1.5x when full)."""


class ForwardBias:
    """The attention bias of the tokens of the current forward, shared by all layers of a prompt.

    The engine sets it once per forward from the 2D attention mask; every layer copies it into
    the columns its ``update`` writes.
    """

    def __init__(self) -> None:
        self.bias: torch.Tensor | None = None  # (B, 1, 1, Q): 0 for a real token, -inf for padding
        self._per_device: dict[torch.device, torch.Tensor] = {}

    def set(self, mask: torch.Tensor | None, batch: int, q_len: int, dtype: torch.dtype, device: torch.device) -> None:
        """Set the bias of the ``q_len`` new tokens from a (B, seen + Q) 0/1 mask (None: all real)."""
        if mask is None:
            bias = torch.zeros(batch, 1, 1, q_len, dtype=dtype, device=device)
        else:
            real = mask[:, -q_len:].to(device=device, dtype=torch.bool)
            bias = torch.zeros(real.shape, dtype=dtype, device=device).masked_fill_(~real, float("-inf"))
            bias = bias.view(batch, 1, 1, q_len)
        self.bias = bias
        self._per_device = {bias.device: bias}

    def on(self, device: torch.device) -> torch.Tensor:
        """The bias on ``device`` (copied once per forward for a model dispatched over devices)."""
        bias = self._per_device.get(device)
        if bias is None:
            bias = self._per_device[device] = self.bias.to(device)
        return bias


class CompressedLayer(CacheLayerMixin):
    """Per-row variable-length KV storage for one layer (see the module docstring).

    Args:
        kv_heads: KV heads of the layer (H).
        forward_bias: the prompt's shared :class:`ForwardBias`.

    Attributes:
        keys / values: (B, H, capacity, D) storage.
        bias: (B, H, 1, capacity) additive mask (0 attend, -inf not).
        kept_positions: (B, H, kept_width) int32 position (index among the tokens seen) of
            every kept entry; -1 for retrieval slots and unused columns.
        seen: tokens seen (prompt and every later token). stored: columns in use.
        kept_width: columns of the kept region; the uncompressed region is ``[kept_width, stored)``.
        compressions: how many times the layer was compressed.
        origins: the prompt row each sequence came from (a cache repeated into beams or samples
            after its prompt, or narrowed to some sequences, maps its rows back to the prompt's).
        retriever: a :class:`~hybridkv.cache.ChunkPool` filling the retrieval slots at every
            decoding step, or None.
        kept_attended: entries of the kept region that rows attend (kept entries and real
            retrieval slots), summed over rows and heads.
        observer: optional callable ``observer(query, layer)`` run before every later
            attention of the layer (head profiling reads decode-time attention through it).
        detached: set when the prompt or the ``with`` block ended: the layer refuses updates.
        rotation: the ``cos``/``sin`` the model passed with the latest update (its tokens'
            RoPE, as :func:`hybridkv.rope.token_rotation` reads them), or None.
    """

    is_sliding = False

    def __init__(self, kv_heads: int, forward_bias: ForwardBias) -> None:
        super().__init__()
        self.kv_heads = kv_heads
        self.forward_bias = forward_bias
        self.seen = self.stored = self.kept_width = self.compressions = self.kept_attended = 0
        self.bias: torch.Tensor | None = None
        self.kept_positions: torch.Tensor | None = None
        self.retriever: Any = None
        self.observer: Any = None
        self.detached = False
        self.rotation: tuple[torch.Tensor, torch.Tensor] | None = None

    # ----------------------------------------------------------------- transformers API
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Record dtype, device, batch and head size from the first keys (B, H, Q, D)."""
        self.dtype, self.device = key_states.dtype, key_states.device
        self.batch, _, _, self.head_dim = key_states.shape
        self.origins = list(range(self.batch))
        self.keys = torch.empty(self.batch, self.kv_heads, 0, self.head_dim, dtype=self.dtype, device=self.device)
        self.values = torch.empty_like(self.keys)
        self.bias = torch.empty(self.batch, self.kv_heads, 1, 0, dtype=self.dtype, device=self.device)
        self.kept_positions = torch.empty(self.batch, self.kv_heads, 0, dtype=torch.int32, device=self.device)
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, cache_kwargs: dict[str, Any] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append new tokens (B, H, Q, D) to the uncompressed region of every row.

        Returns the stored keys and values (B, H, stored, D) (views); the hybridkv attention
        function reads the layer's bias and retrieval slots itself.
        """
        if self.detached:
            raise RuntimeError("this cache was compressed by hybridkv inside `with method.apply(model):` and that block "
                               "(or its prompt) has ended; start a new cache for plain generation.")
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        kwargs = cache_kwargs or {}
        self.rotation = (kwargs["cos"], kwargs["sin"]) if "cos" in kwargs and "sin" in kwargs else None
        end = self.stored + key_states.shape[-2]
        if end > self.keys.shape[-2]:
            self._grow(end)
        self.keys[:, :, self.stored : end] = key_states
        self.values[:, :, self.stored : end] = value_states
        self.bias[:, :, :, self.stored : end] = self.forward_bias.on(self.device)
        self.seen += end - self.stored
        self.stored = end
        return self.keys[:, :, :end], self.values[:, :, :end]

    def get_seq_length(self) -> int:
        """Tokens seen so far (prompt + everything after), not tokens kept."""
        return self.seen

    def get_mask_sizes(self, cache_position: torch.Tensor) -> tuple[int, int]:
        """(stored + Q, seen - stored), as a sliding-window layer reports (the hybridkv attention
        builds its own mask per row; transformers builds none for it)."""
        return self.stored + cache_position.shape[0], self.seen - self.stored

    def get_max_cache_shape(self) -> int:
        """No maximum length (grows like a DynamicLayer)."""
        return -1

    def reset(self) -> None:
        """Drop everything (a fresh prompt follows)."""
        self.__init__(self.kv_heads, self.forward_bias)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Reorder the sequences (beam search): row ``i`` becomes old row ``beam_idx[i]``.

        Beams of one prompt compress identically, so ``kept_attended`` is unchanged.
        """
        if self.is_initialized:
            self._select_rows(beam_idx.to(self.device))

    def batch_repeat_interleave(self, repeats: int) -> None:
        """Repeat every sequence ``repeats`` times (expanding a prompt into beams or samples)."""
        if self.is_initialized:
            self._select_rows(torch.arange(self.batch, device=self.device).repeat_interleave(repeats))
            self.kept_attended *= repeats
            self.origins = [origin for origin in self.origins for _ in range(repeats)]

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep only the sequences ``indices``."""
        if self.is_initialized:
            self._select_rows(indices.to(self.device))
            self.kept_attended = int((self.bias[:, :, 0, : self.kept_width] == 0).sum())
            self.origins = [self.origins[i] for i in indices.tolist()]

    def crop(self, max_length: int) -> None:
        """Forget the tokens seen after the first ``max_length`` (negative: drop that many).

        Only uncompressed tokens can be forgotten (assisted decoding drops rejected drafts).
        """
        if max_length < 0:
            max_length = self.seen - abs(max_length)
        if max_length >= self.seen:
            return
        first = self.seen - (self.stored - self.kept_width)  # position of the first uncompressed token
        if max_length < first:
            raise ValueError(f"cannot crop a compressed cache to {max_length} tokens: the first {first} were already "
                             "compressed; crop only tokens generated since the last compression.")
        self.stored -= self.seen - max_length
        self.seen = max_length

    # ----------------------------------------------------------------- hybridkv API
    @property
    def first_uncompressed(self) -> int:
        """Position of the first token of the uncompressed region."""
        return self.seen - (self.stored - self.kept_width)

    def segment(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The uncompressed region's keys and values, (B, H, S, D) views."""
        return self.keys[:, :, self.kept_width : self.stored], self.values[:, :, self.kept_width : self.stored]

    def compact(self, keep: torch.Tensor, slots: torch.Tensor | None = None,
                pooled: torch.Tensor | None = None) -> torch.Tensor:
        """Compress the uncompressed region: each row keeps its entries marked in ``keep``.

        The new kept region holds, per row, the entries it kept before, then the newly kept
        ones (both in order), then ``slots`` retrieval slots or ``pooled`` columns for a
        retrieval pool kept in the row (``-inf`` until a step opens its picked chunks); with
        either, the last column of the region is the trash column (``-inf`` in every row).
        Called once per compression event (end of a prefill or of a later turn); it may
        synchronise.

        Args:
            keep: (B, H, S) bool over the uncompressed columns ``[kept_width, stored)``.
            slots: (B, H) long retrieval slots per row (all retrieval slots of the row: those of
                earlier compressions included), or None.
            pooled: (B, H) long pool columns per row (the retriever writes them), or None.
        Returns:
            (B, H) long: the first column after every row's kept entries (its slots or pool).
        """
        batch, heads, width = keep.shape
        if width != self.stored - self.kept_width or batch != self.batch or heads != self.kv_heads:
            raise ValueError(f"compact() expects a (B, H, S) = {(self.batch, self.kv_heads, self.stored - self.kept_width)} "
                             f"mask over the uncompressed region, got {tuple(keep.shape)}.")
        device = self.device
        old = self.kept_positions >= 0  # (B, H, W) real kept entries (not slots, not unused columns)
        segment_positions = torch.arange(self.first_uncompressed, self.seen, device=device, dtype=torch.int32)
        valid = torch.cat([old, keep.to(device)], dim=2)  # (B, H, W + S) over the columns [0, stored)
        positions = torch.cat([self.kept_positions, segment_positions.expand(batch, heads, -1)], dim=2)
        count = valid.sum(-1)  # (B, H)
        slots = torch.zeros_like(count) if slots is None else slots.to(device=device, dtype=torch.long)
        pooled = torch.zeros_like(count) if pooled is None else pooled.to(device=device, dtype=torch.long)
        entries = int(count.max())
        width_kept = int((count + slots + pooled).max()) + int(bool(slots.any() or pooled.any()))  # + trash
        # valid columns first, each row in column order; the rest of the row is unused
        order = torch.argsort((~valid).to(torch.int8), dim=-1, stable=True)[..., :entries]  # (B, H, entries)
        capacity = width_kept + MIN_SPARE_COLUMNS
        columns = torch.arange(capacity, device=device)
        keys = torch.zeros(batch, heads, capacity, self.head_dim, dtype=self.dtype, device=device)
        values = torch.zeros_like(keys)
        gather = order[..., None].expand(-1, -1, -1, self.head_dim)
        keys[:, :, :entries] = self.keys[:, :, : self.stored].gather(2, gather)
        values[:, :, :entries] = self.values[:, :, : self.stored].gather(2, gather)
        is_entry = columns[None, None, :width_kept] < count[..., None]
        kept_positions = torch.full((batch, heads, width_kept), -1, dtype=torch.int32, device=device)
        kept_positions[..., :entries] = positions.gather(2, order)
        kept_positions.masked_fill_(~is_entry, -1)
        attended = is_entry | (columns[None, None, :width_kept] < (count + slots)[..., None])
        bias = torch.full((batch, heads, 1, capacity), float("-inf"), dtype=self.dtype, device=device)
        bias[:, :, 0, :width_kept].masked_fill_(attended, 0.0)
        self.keys, self.values, self.bias, self.kept_positions = keys, values, bias, kept_positions
        self.kept_width = self.stored = width_kept
        self.kept_attended = int(attended.sum())
        self.compressions += 1
        return count

    def _grow(self, needed: int) -> None:
        """Reallocate to ``needed`` columns plus half the uncompressed region as spare (at least
        :data:`MIN_SPARE_COLUMNS`), keeping the stored columns: the uncompressed region grows
        1.5x at a time (amortised O(1) copies per token) and the kept region gets no slack."""
        capacity = needed + max(MIN_SPARE_COLUMNS, (needed - self.kept_width) // 2)
        shape = (self.batch, self.kv_heads, capacity, self.head_dim)
        keys = torch.zeros(shape, dtype=self.dtype, device=self.device)
        values = torch.zeros(shape, dtype=self.dtype, device=self.device)
        bias = torch.full((self.batch, self.kv_heads, 1, capacity), float("-inf"), dtype=self.dtype, device=self.device)
        keys[:, :, : self.stored] = self.keys[:, :, : self.stored]
        values[:, :, : self.stored] = self.values[:, :, : self.stored]
        bias[..., : self.stored] = self.bias[..., : self.stored]
        self.keys, self.values, self.bias = keys, values, bias

    def _select_rows(self, rows: torch.Tensor) -> None:
        """Keep (and reorder or repeat) the sequences ``rows`` (R,) of every per-sequence tensor."""
        self.keys, self.values = self.keys.index_select(0, rows), self.values.index_select(0, rows)
        self.bias = self.bias.index_select(0, rows)
        self.kept_positions = self.kept_positions.index_select(0, rows)
        if self.retriever is not None:
            self.retriever.select_rows(rows)
        self.batch = rows.shape[0]

    def row_positions(self, sequence: int, head: int) -> tuple[set[int], set[int]]:
        """(positions row (sequence, head) holds in all tiers, positions it retrieved at the last
        step); for reports, pictures and tests (it synchronises)."""
        held = set(self.kept_positions[sequence, head][self.kept_positions[sequence, head] >= 0].tolist())
        retrieved: set[int] = set()
        if self.retriever is not None:
            pooled, picked = self.retriever.row_positions(sequence, head)
            held |= pooled
            retrieved = picked
        return held, retrieved

    def stored_per_head(self) -> list[list[int]]:
        """Prompt entries held per sequence and KV head in all tiers: kept entries plus the
        row's retrieval pool (chunk tokens). May synchronise (it is for reports)."""
        kept = (self.kept_positions >= 0).sum(-1)  # (B, H)
        if self.retriever is not None:
            kept = kept + self.retriever.pooled_tokens().to(kept.device)
        return kept.tolist()
