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
        """(M,) upper bound of the chunk's attention logits for the queries q (Hq, Q, D)."""
        kv_heads = self.select_per_head.shape[0]
        hq, q_len, dim = q.shape
        qg = q.reshape(kv_heads, (hq // kv_heads) * q_len, dim)[self.chunk_heads].float()  # (M, G*Q, D)
        bound = torch.maximum(qg * self.kmin[:, None].float(), qg * self.kmax[:, None].float()).sum(-1)
        return bound.amax(dim=-1)

    def select(self, q: torch.Tensor) -> torch.Tensor:
        """Indices of the chunks each head attends this step: its ``select_per_head`` best."""
        scores = self.chunk_scores(q)
        by_score = scores.argsort(descending=True, stable=True)
        order = by_score[self.chunk_heads[by_score].argsort(stable=True)]  # grouped by head, best first
        heads = self.chunk_heads[order]
        counts = torch.bincount(self.chunk_heads, minlength=self.select_per_head.shape[0])
        first = torch.cumsum(counts, 0) - counts
        rank = torch.arange(order.shape[0], device=order.device) - first[heads]
        return order[rank < self.select_per_head[heads]]

    def extra_entries(self, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Flat (S*C, D) keys and values of the selected chunks and their (S*C,) heads."""
        chosen = self.select(q)
        self.last_selected = chosen
        index = chosen.to(self.keys.device)
        keys = self.keys[index].flatten(0, 1).to(self.device, non_blocking=True)
        values = self.values[index].flatten(0, 1).to(self.device, non_blocking=True)
        return keys, values, self.chunk_heads[chosen].repeat_interleave(self.chunk_size)
