"""Chunk-wise retrieval for dynamic heads (stage 3 of HybridKV; also Quest's page selection).

A dynamic head's prompt KV (outside its always-kept tokens) is held as chunks of C consecutive
tokens with a per-chunk key summary: the channel-wise min and max of the chunk's keys (as in
Quest). At every decoding step each chunk is scored by the upper bound of ``q . k`` over the
chunk, ``sum_d max(q_d min_d, q_d max_d)`` (max over the query heads of the GQA group), and
each head gathers its own number of top chunks. Scoring and gathering are batched over all
chunks of all heads of a layer (no Python loop over heads or chunks).

Where the chunks live is a parameter: ``"device"`` (with the model) or ``"host"`` (CPU memory,
pinned when the model is on a GPU; only the selected chunks are copied to the device each
step). The summaries always stay on the device.
"""

from __future__ import annotations

import torch


class ChunkRetriever:
    """The chunk pool of one layer's dynamic heads.

    Args:
        keys / values: (M, C, D) chunk keys (after RoPE) and values.
        chunk_heads: (M,) KV head of each chunk.
        chunk_starts: (M,) prompt position of each chunk's first token (for reports and plots).
        select_per_head: (kv_heads,) chunks each head attends per step (0 for heads without chunks).
        store: ``"device"`` or ``"host"``.
    """

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, chunk_heads: torch.Tensor, chunk_starts: torch.Tensor,
                 select_per_head: torch.Tensor, store: str = "device") -> None:
        device = keys.device
        self.device = device
        self.chunk_size = keys.shape[1]
        self.kmin = keys.amin(dim=1)  # (M, D)
        self.kmax = keys.amax(dim=1)
        self.chunk_heads = chunk_heads.to(device=device, dtype=torch.long)
        self.chunk_starts = chunk_starts.to(torch.int32)
        self.select_per_head = select_per_head.to(device=device, dtype=torch.long)
        kv_heads = self.select_per_head.shape[0]
        counts = torch.bincount(self.chunk_heads, minlength=kv_heads)
        in_order = bool((self.chunk_heads[1:] >= self.chunk_heads[:-1]).all())
        self.blocked = in_order and bool((counts == counts[0]).all())  # a (kv_heads, m) grid of chunks
        if bool((self.select_per_head > counts).any()):
            raise ValueError(f"select_per_head {self.select_per_head.tolist()} exceeds the chunks of some head "
                             f"({counts.tolist()}): a head cannot attend more chunks than it holds.")
        # Per-step constants: each head's first chunk in head order, the retrieving heads, each
        # chunk's row in the per-step block, and which block rows are real.
        self.first_chunk = torch.cumsum(counts, 0) - counts  # (kv_heads,)
        self.retrieving = (self.select_per_head > 0).nonzero().flatten()  # (P,)
        slot = torch.full((kv_heads,), -1, dtype=torch.long, device=device)
        slot[self.retrieving] = torch.arange(self.retrieving.shape[0], device=device)
        self.chunk_slot = slot[self.chunk_heads]  # (M,)
        self.most = int(self.select_per_head.max()) if self.retrieving.numel() else 0
        valid = torch.arange(self.most, device=device)[None, :] < self.select_per_head[self.retrieving][:, None]
        self.valid_rows = None if bool(valid.all()) else valid.repeat_interleave(self.chunk_size, dim=1)
        self.store = store
        if store == "host":
            pin = device.type == "cuda"
            keys = keys.to("cpu").pin_memory() if pin else keys.to("cpu", copy=True)
            values = values.to("cpu").pin_memory() if pin else values.to("cpu", copy=True)
        self.keys, self.values = keys, values
        self.last_selected = torch.empty(0, dtype=torch.long)

    @property
    def offloaded_bytes(self) -> int:
        """Bytes of chunk keys and values held in host memory (0 for the device store)."""
        if self.store != "host":
            return 0
        return self.keys.untyped_storage().nbytes() + self.values.untyped_storage().nbytes()

    def stored_per_head(self) -> list[int]:
        """Prompt tokens each KV head holds in the pool."""
        counts = torch.bincount(self.chunk_heads, minlength=self.select_per_head.shape[0])
        return (counts * self.chunk_size).tolist()

    def chunk_scores(self, q: torch.Tensor) -> torch.Tensor:
        """(M,) upper bound of the chunk's attention logits for the queries q (Hq, Q, D).

        ``max(q_d min_d, q_d max_d) = relu(q_d) max_d + min(q_d, 0) min_d``, so the bound is two
        matrix products. When every head has the same number of chunks, in head order (Quest's
        pages), they are batched per head with no gather; otherwise each chunk gathers its
        head's queries.
        """
        kv_heads = self.select_per_head.shape[0]
        hq, q_len, dim = q.shape
        qg = q.reshape(kv_heads, (hq // kv_heads) * q_len, dim).float()  # (Hkv, G*Q, D)
        pos, neg = qg.clamp_min(0), qg.clamp_max(0)
        if self.blocked:
            kmax = self.kmax.view(kv_heads, -1, dim).float()
            kmin = self.kmin.view(kv_heads, -1, dim).float()
            bound = torch.baddbmm(torch.bmm(pos, kmax.transpose(1, 2)), neg, kmin.transpose(1, 2))  # (Hkv, G*Q, m)
            return bound.amax(dim=1).flatten()
        bound = (pos[self.chunk_heads] * self.kmax[:, None].float()).sum(-1)  # (M, G*Q)
        bound += (neg[self.chunk_heads] * self.kmin[:, None].float()).sum(-1)
        return bound.amax(dim=-1)

    def _ranked(self, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Chosen chunk indices grouped by head (best first) and each one's rank inside its head."""
        scores = self.chunk_scores(q)
        by_score = scores.argsort(descending=True, stable=True)
        order = by_score[self.chunk_heads[by_score].argsort(stable=True)]  # grouped by head, best first
        heads = self.chunk_heads[order]
        rank = torch.arange(order.shape[0], device=order.device) - self.first_chunk[heads]
        chosen = rank < self.select_per_head[heads]
        return order[chosen], rank[chosen]

    def select(self, q: torch.Tensor) -> torch.Tensor:
        """Indices of the chunks each head attends this step: its ``select_per_head`` best."""
        return self._ranked(q)[0]

    def retrieved(self, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """This step's chunks as one block per head that retrieves.

        Returns:
            ``heads`` (P,) the P heads with ``select_per_head > 0``; ``keys`` / ``values``
            (P, S*C, D) on the model's device, S the largest per-head selection; ``valid``
            (P, S*C) bool marking real rows (None when every head selects S chunks).
        """
        chosen, rank = self._ranked(q)
        self.last_selected = chosen
        index = torch.full((self.retrieving.shape[0], self.most), -1, dtype=torch.long, device=chosen.device)
        index[self.chunk_slot[chosen], rank] = chosen
        gather = index.clamp_min(0).to(self.keys.device)
        keys = self.keys[gather].flatten(1, 2).to(self.device, non_blocking=True)  # (P, S*C, D)
        values = self.values[gather].flatten(1, 2).to(self.device, non_blocking=True)
        return self.retrieving, keys, values, self.valid_rows
