"""Chunk-wise retrieval for the heads that retrieve (HybridKV's dynamic heads, Quest's pages).

A retrieving row (one sequence's KV head) holds part of its context as chunks of ``C``
consecutive tokens with a per-chunk key summary: the channel-wise min and max of the chunk's
keys (as in Quest). At every decoding step each chunk is scored by the upper bound of
``q . k`` over the chunk, ``sum_d max(q_d min_d, q_d max_d)`` (max over the query rows of the
GQA group); with the box's centre ``c = (max + min) / 2`` and radius ``r = (max - min) / 2``
that bound is ``q . c + |q| . r``, one matrix product of ``[q, |q|]`` with the stacked summary
``[c; r]``. Each row takes its best ``select`` chunks, which the one attention call of the step
(:class:`~hybridkv.cache.CompressedLayer`) then reads beside the row's kept entries.

Where the chunks live decides how they are read:

* **in the row** (``store="device"``, the default when it fits): a row's pool occupies columns
  of its own row of the layer, after its kept entries. A layer is one rectangle as wide as its
  widest row, so a retrieving row (few attended entries) has unused columns anyway: its pool
  fills them at no extra memory, and the attention reads them anyway. A step only opens the
  picked chunks' columns in the attention bias (0) and closes the others (``-inf``): nothing
  is copied.
* **in the pool's own storage**, when in-row pools would widen the rectangle by more than
  :data:`IN_ROW_SLACK` (Quest, whose pool is the whole prompt: the attention must not read it),
  or in CPU memory (``store="host"``, pinned when the model is on a GPU): a step copies the
  picked chunks into the row's retrieval slots. The host store needs the picks on the host:
  one synchronisation per layer and step. The summaries always stay on the device.

Shapes are static per prompt and every index is flat, so a step is a handful of tensor ops
whatever the number of heads or chunks, with no host synchronisation (device store): heads with
fewer chunks are padded with ``-inf`` scores; heads that select fewer chunks than the largest
selection ignore (in-row) or send to the layer's trash column (slots) their extra picks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

IN_ROW_SLACK = 1.25
"""Pools are kept in their rows when that leaves the layer at most this much wider than its
attended columns (kept entries and slots)."""


@dataclass
class HeadChunks:
    """The chunk pool of one retrieving row: one KV head of one sequence.

    Attributes:
        head: the KV head. keys / values: (M, C, D) chunk keys (after RoPE) and values.
        positions: (M, C) int32 positions (among the tokens seen) of the chunk tokens.
        select: chunks attended per decoding step (<= M).
    """

    head: int
    keys: torch.Tensor
    values: torch.Tensor
    positions: torch.Tensor
    select: int

    def __post_init__(self) -> None:
        if not 0 <= self.select <= self.keys.shape[0]:
            raise ValueError(f"a head cannot attend more chunks than it holds: select={self.select}, "
                             f"chunks={self.keys.shape[0]}.")


def merge_heads(rows: list[list[HeadChunks]]) -> list[list[HeadChunks]]:
    """Join the chunk pools of the same (sequence, head) (pools of successive compressions)."""
    merged = []
    for row in rows:
        by_head: dict[int, list[HeadChunks]] = {}
        for item in row:
            by_head.setdefault(item.head, []).append(item)
        merged.append([
            HeadChunks(head, torch.cat([p.keys for p in parts]), torch.cat([p.values for p in parts]),
                       torch.cat([p.positions for p in parts]), sum(p.select for p in parts))
            for head, parts in sorted(by_head.items())
        ])
    return merged


class PoolStep(NamedTuple):
    """The tensors one retrieval step reads (see :func:`retrieve`), all flat and static in shape."""

    query_rows: torch.Tensor  # (B*P,) row of each retrieving head among the (B*H) query groups
    summary: torch.Tensor  # (B*P, 2D, Mh)
    chunk_bias: torch.Tensor  # (B*P, Mh)
    select: int  # S
    taken: torch.Tensor  # (B*P, S) bool: which of a head's S picks it attends (its own selection)
    bias_rows: torch.Tensor | None  # in-row: (B*P*Mh*C,) row of the layer's flat bias for every chunk token
    sources: torch.Tensor | None  # own store: (B*P, Mh, C) row of every chunk token in the store
    targets: torch.Tensor | None  # own store: (B*P*S*C,) row of the layer's (B*H*capacity, D) view per pick
    keys: torch.Tensor | None  # own store: (N, D) chunk keys
    values: torch.Tensor | None


def pick(query: torch.Tensor, pool: PoolStep) -> torch.Tensor:
    """Each retrieving head's best chunks for the step's queries (B, H, R, D) grouped by KV head.

    Returns:
        (B*P, S) the picked chunks (indices among the head's Mh chunks), best first.
    """
    mine = query.flatten(0, 1).index_select(0, pool.query_rows)  # (B*P, R, D)
    bound = torch.bmm(torch.cat([mine, mine.abs()], dim=-1), pool.summary).amax(dim=1)  # (B*P, Mh)
    return (bound + pool.chunk_bias).topk(pool.select, dim=-1).indices


def retrieve(keys: torch.Tensor, values: torch.Tensor, bias: torch.Tensor, query: torch.Tensor,
             pool: PoolStep) -> torch.Tensor:
    """One retrieval step (device store): :func:`pick`, then open the picked chunks' columns in
    the bias (in-row pools) or copy the picked chunks into the slots (own store).

    A pure function of tensors, so ``torch.compile(fullgraph=True)`` traces it.

    Args:
        keys / values: (B, H, capacity, D) the layer's whole (contiguous) buffers.
        bias: (B, H, 1, capacity) the layer's whole bias; keys, values or bias are written in place.
        query: (B, H, R, D) the step's queries grouped by KV head.
    Returns:
        (B*P, S) the picked chunks.
    """
    picks = pick(query, pool)
    if pool.bias_rows is not None:
        chosen = torch.zeros_like(pool.chunk_bias, dtype=torch.bool).scatter_(1, picks, pool.taken)  # (B*P, Mh)
        opened = torch.zeros(chosen.shape, dtype=bias.dtype, device=bias.device).masked_fill_(~chosen, float("-inf"))
        size = pool.bias_rows.shape[0] // opened.numel()
        bias.view(-1).index_copy_(0, pool.bias_rows, opened[..., None].expand(-1, -1, size).flatten())
        return picks
    dim = query.shape[-1]
    rows = pool.sources.gather(1, picks[..., None].expand(-1, -1, pool.sources.shape[-1])).flatten()  # (B*P*S*C,)
    keys.view(-1, dim).index_copy_(0, pool.targets, pool.keys.index_select(0, rows))
    values.view(-1, dim).index_copy_(0, pool.targets, pool.values.index_select(0, rows))
    return picks


class ChunkPool:
    """The chunk pools of one layer's retrieving rows, padded into static shapes.

    Args:
        rows: per sequence, its retrieving heads' :class:`HeadChunks`.
        kv_heads: KV heads of the layer (H).
        start: (B, H) first column after each row's kept entries: its pool (in-row) or its
            retrieval slots (own store).
        trash: the layer's trash column (never attended).
        store: ``"device"`` or ``"host"``.
        layer: the layer's (keys, values) buffers to write in-row pools into, or None for the
            pool's own storage.

    Attributes (B sequences, P the most retrieving heads of a sequence, Mh the most chunks of a
    head, C the chunk size, S the largest selection):
        positions: (B, P, Mh, C) int32 positions of the chunk tokens (-1 for padding).
        summary: (B*P, 2D, Mh) per retrieving head, its chunks' key-box centres over their radii
            (the bytes of a min and a max per chunk), in the keys' dtype.
        chunk_bias: (B*P, Mh) in the keys' dtype, 0 for a real chunk and -inf for padding.
        heads: (B, P) long KV head of each retrieving head (padding: head 0, never selected).
        selects: (B, P) long chunks each head attends per step. taken: (B*P, S) bool pick ranks it attends.
        columns: (B, P, Mh, C) long layer column of every chunk token (in-row; padding: trash).
        keys / values: (B*Mseq*C, D) the pool's own storage (every sequence's chunks, Mseq the
            most of a sequence), or None for in-row pools.
        slots: (B, P, S, C) long layer column each picked token is copied to (own store).
        select: S. last_picks: (B*P, S) chunks picked at the last step.
    """

    def __init__(self, rows: list[list[HeadChunks]], kv_heads: int, start: torch.Tensor, trash: int,
                 store: str = "device", layer: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        if store not in ("device", "host"):
            raise ValueError(f"store must be 'device' or 'host', got {store!r}.")
        first = next(item for row in rows for item in row)
        device, dtype = first.keys.device, first.keys.dtype
        batch, size, dim = len(rows), first.keys.shape[1], first.keys.shape[2]
        self.kv_heads, self.store, self.device, self.trash, self.chunk_size = kv_heads, store, device, trash, size
        heads = max(len(row) for row in rows)
        most = max(item.keys.shape[0] for row in rows for item in row)
        total = max(sum(item.keys.shape[0] for item in row) for row in rows)
        self.select = max(item.select for row in rows for item in row)
        self.positions = torch.full((batch, heads, most, size), -1, dtype=torch.int32, device=device)
        summary = torch.zeros(batch, heads, 2 * dim, most, dtype=dtype, device=device)
        chunk_bias = torch.full((batch, heads, most), float("-inf"), dtype=dtype, device=device)
        self.heads = torch.zeros(batch, heads, dtype=torch.long, device=device)
        self.selects = torch.zeros(batch, heads, dtype=torch.long, device=device)
        in_row = layer is not None
        self.columns = torch.full((batch, heads, most, size), trash, dtype=torch.long, device=device) if in_row else None
        self.slots = None if in_row else torch.full((batch, heads, self.select, size), trash, dtype=torch.long,
                                                    device=device)
        stored = None if in_row else torch.zeros(batch, total, size, dim, dtype=dtype, device=device)
        stored_values = None if stored is None else torch.zeros_like(stored)
        self._local = None if in_row else torch.zeros(batch, heads, most, size, dtype=torch.long, device=device)
        starts = start.tolist()
        token = torch.arange(size, device=device)
        for b, row in enumerate(rows):
            offset = 0
            for p, item in enumerate(row):
                m, begin = item.keys.shape[0], starts[b][item.head]
                self.positions[b, p, :m] = item.positions
                low, high = item.keys.float().amin(dim=1), item.keys.float().amax(dim=1)  # (m, D)
                summary[b, p, :, :m] = (torch.cat([high + low, high - low], dim=1).T / 2).to(dtype)
                chunk_bias[b, p, :m] = 0.0
                self.heads[b, p], self.selects[b, p] = item.head, item.select
                if in_row:  # the pool's tokens go to the row's columns after its kept entries
                    columns = begin + torch.arange(m * size, device=device).view(m, size)
                    self.columns[b, p, :m] = columns
                    layer[0][b, item.head, columns] = item.keys
                    layer[1][b, item.head, columns] = item.values
                else:
                    taken = begin + torch.arange(item.select * size, device=device)
                    self.slots[b, p, : item.select] = taken.view(item.select, size)
                    stored[b, offset : offset + m] = item.keys
                    stored_values[b, offset : offset + m] = item.values
                    self._local[b, p, :m] = (b * total + offset + torch.arange(m, device=device))[:, None] * size + token
                offset += m
        self.summary, self.chunk_bias = summary.flatten(0, 1), chunk_bias.flatten(0, 1)
        self.keys = self.values = None
        if stored is not None:
            self.keys, self.values = stored.flatten(0, 2), stored_values.flatten(0, 2)
            if store == "host":
                pin = device.type == "cuda"
                self.keys = self.keys.to("cpu").pin_memory() if pin else self.keys.to("cpu", copy=True)
                self.values = self.values.to("cpu").pin_memory() if pin else self.values.to("cpu", copy=True)
        self._index(capacity=0)
        self.last_picks = torch.empty(0, dtype=torch.long)

    def _index(self, capacity: int) -> None:
        """Flat indices of the step for a layer buffer of ``capacity`` columns (recomputed when the
        layer grows or the sequences are reordered)."""
        batch, heads = self.heads.shape
        groups = torch.arange(batch, device=self.device)[:, None] * self.kv_heads + self.heads  # (B, P)
        self.query_rows = groups.flatten()
        self.taken = (torch.arange(self.select, device=self.device) < self.selects[..., None]).flatten(0, 1)
        self.bias_rows = self.sources = self.targets = None
        if self.columns is not None:
            self.bias_rows = (groups[..., None, None] * capacity + self.columns).flatten()
        else:
            self.sources = self._local.flatten(0, 1)
            self.targets = (groups[..., None, None] * capacity + self.slots).flatten()
        self.capacity = capacity

    @property
    def in_row(self) -> bool:
        """Whether the chunks live in the layer's rows."""
        return self.columns is not None

    @property
    def offloaded_bytes(self) -> int:
        """Bytes of chunk keys and values held in host memory (0 for the device store)."""
        if self.store != "host":
            return 0
        return self.keys.untyped_storage().nbytes() + self.values.untyped_storage().nbytes()

    def step(self, capacity: int) -> PoolStep | None:
        """The tensors of a retrieval step into a layer buffer of ``capacity`` columns (device
        store; None when no head selects a chunk)."""
        if self.select == 0:
            return None
        if capacity != self.capacity:
            self._index(capacity)
        return PoolStep(self.query_rows, self.summary, self.chunk_bias, self.select, self.taken, self.bias_rows,
                        self.sources, self.targets, self.keys, self.values)

    def fill(self, keys: torch.Tensor, values: torch.Tensor, bias: torch.Tensor, query: torch.Tensor) -> None:
        """This step's retrieval into the layer's buffers (keys, values, bias: the whole buffers).

        Args:
            query: (B, H, R, D) the step's queries grouped by KV head (R = group x Q).
        """
        if self.select == 0:
            return
        if self.store == "device":
            self.last_picks = retrieve(keys, values, bias, query, self.step(keys.shape[2]))
            return
        dim = query.shape[-1]  # host store: the picks go to the host, the chunks come back
        self.last_picks = pick(query, self.step(keys.shape[2]))
        size = self.chunk_size
        rows = self.sources.gather(1, self.last_picks[..., None].expand(-1, -1, size)).flatten().cpu()
        keys.view(-1, dim).index_copy_(0, self.targets, self.keys.index_select(0, rows).to(keys.device, non_blocking=True))
        values.view(-1, dim).index_copy_(0, self.targets,
                                         self.values.index_select(0, rows).to(values.device, non_blocking=True))

    def select_rows(self, rows: torch.Tensor) -> None:
        """Keep (reorder, repeat) the sequences ``rows`` (R,) of every per-sequence tensor."""
        batch = self.heads.shape[0]
        for name in ("heads", "selects", "slots", "positions", "columns", "_local"):
            if getattr(self, name) is not None:
                setattr(self, name, getattr(self, name).index_select(0, rows))
        self.summary = self.summary.view(batch, -1, *self.summary.shape[1:]).index_select(0, rows).flatten(0, 1)
        self.chunk_bias = self.chunk_bias.view(batch, -1, self.chunk_bias.shape[1]).index_select(0, rows).flatten(0, 1)
        if self.keys is not None:  # own storage: sequence blocks move, and the token rows with them
            per = self.keys.shape[0] // batch
            host = rows.to(self.keys.device)
            self.keys = self.keys.view(batch, per, -1).index_select(0, host).flatten(0, 1)
            self.values = self.values.view(batch, per, -1).index_select(0, host).flatten(0, 1)
            self._local = self._local % per + (torch.arange(rows.shape[0], device=self.device) * per)[:, None, None, None]
        self._index(self.capacity)

    def attended_tokens(self) -> int:
        """Chunk tokens attended per step, summed over rows (synchronises)."""
        return int(self.selects.sum()) * self.chunk_size

    def pooled_tokens(self) -> torch.Tensor:
        """(B, H) chunk tokens each row holds in the pool."""
        batch, heads = self.heads.shape
        real = (self.chunk_bias.view(batch, heads, -1) == 0).sum(-1)  # (B, P)
        out = torch.zeros(batch, self.kv_heads, dtype=torch.long, device=self.device)
        return out.scatter_add_(1, self.heads, real * self.chunk_size)

    def row_positions(self, sequence: int, head: int) -> tuple[set[int], set[int]]:
        """(positions in the pool of row (sequence, head), positions it picked at the last step)."""
        batch, heads = self.heads.shape
        pooled, picked = set(), set()
        for p in (self.heads[sequence] == head).nonzero().flatten().tolist():
            real = self.chunk_bias.view(batch, heads, -1)[sequence, p] == 0
            pooled |= set(self.positions[sequence, p][real].flatten().tolist())
            if self.last_picks.numel():
                chosen = self.last_picks.view(batch, heads, -1)[sequence, p][: int(self.selects[sequence, p])]
                picked |= set(self.positions[sequence, p, chosen].flatten().tolist())
        return pooled, picked

    def head_chunks(self, keys: torch.Tensor, values: torch.Tensor) -> list[list[HeadChunks]]:
        """The pools as :class:`HeadChunks` per sequence (to join them with a later compression's).

        Args:
            keys / values: the layer's buffers (B, H, capacity, D), where in-row pools live.
        """
        batch, heads = self.heads.shape
        real = (self.chunk_bias.view(batch, heads, -1) == 0).tolist()
        selects = self.selects.tolist()
        rows = []
        for b in range(batch):
            row = []
            for p in range(heads):
                m = sum(real[b][p])
                if not m:
                    continue
                head = int(self.heads[b, p])
                if self.in_row:
                    columns = self.columns[b, p, :m]
                    chunk_k, chunk_v = keys[b, head][columns], values[b, head][columns]
                else:
                    tokens = self._local[b, p, :m].flatten().to(self.keys.device)
                    chunk_k = self.keys.index_select(0, tokens).view(m, self.chunk_size, -1).to(self.device)
                    chunk_v = self.values.index_select(0, tokens).view(m, self.chunk_size, -1).to(self.device)
                row.append(HeadChunks(head, chunk_k, chunk_v, self.positions[b, p, :m], selects[b][p]))
            rows.append(row)
        return rows
