"""HybridKV (arXiv 2604.05887, "HybridKV: Hybrid KV Cache Compression for Efficient Multimodal
Large Language Model Inference"), as defined in ``DESIGN.md``.

Stage 1 (:mod:`hybridkv.profile`) types each KV head static or dynamic; stage 2
(:mod:`hybridkv.budget`) splits the memory budget top-down; stage 3 (here) compresses:

* **static heads — text-prior pruning**, once at the end of prefill: prompt tokens are scored
  by the text-prior queries' attention (mean over those queries and the GQA group,
  average-pooled over ``kernel_size`` neighbours); the head keeps its protected tokens and the
  best-scoring rest of its budget; everything else is freed.
* **dynamic heads — chunk-wise retrieval**: the protected tokens are always kept; the rest of
  the prompt is cut into chunks of ``chunk_size`` tokens with min/max key summaries
  (:class:`~hybridkv.retrieval.ChunkRetriever`); every decoding step attends over the
  protected tokens + the best-scoring chunks that fit the head's attended budget + the recent
  (generated) tokens.

Protected tokens of every head: the first ``sink_tokens``, all prompt text tokens (outside the
visual / context span) and the last ``window`` prompt tokens.

Memory accounting (why the default pool stays ~10x below the full cache at a 10% budget): a
head's budget from stage 2 is in *memory slots*. A dynamic head spends its slots on protected
tokens and on a retrieval pool; a pooled chunk costs ``chunk_size + 1`` slots (its tokens plus
the min/max summary, the size of one token's K and V). It attends per step to
``1 / pool`` of its pool (``pool`` = the pool's size as a multiple of the attended budget).
The pool is chosen at prefill: ``1 - coverage`` of it by chunk-level text prior, the rest
spread evenly over the remaining chunks (coverage of the rest of the image).
``pool=None`` keeps every chunk (Quest-like; memory not bounded, meant for ``store="host"``).
A head whose budget covers the whole prompt keeps everything (exact).
"""

from __future__ import annotations

import math

import torch

from hybridkv.budget import allocate
from hybridkv.cache import CompressedLayer
from hybridkv.methods.base import LayerContext, Method
from hybridkv.models.architectures import ModelSpec
from hybridkv.profile import HeadProfile, classify, top_prior
from hybridkv.retrieval import ChunkRetriever
from hybridkv.scoring import pool_scores, query_attention, top_mask
from hybridkv.spans import PromptSpans


class HybridKV(Method):
    """Hybrid static/dynamic head compression.

    Args:
        budget: fraction in (0, 1] of the prompt's KV (memory slots, all tiers), or int tokens
            per KV head on average.
        profile: a :class:`~hybridkv.profile.HeadProfile` of this model (offline stage 1);
            None classifies heads online from the prefill (text-prior queries' disagreement).
        chunk_size: tokens per retrieval chunk (C).
        pool: retrieval pool size as a multiple of a dynamic head's attended chunks, or None
            to keep every chunk.
        store: where dynamic heads' chunks live: ``"device"`` or ``"host"``.
        sink_tokens / window: leading / trailing prompt tokens every head keeps.
        kernel_size: pooling width of text-prior scores (odd).
        coverage: share of the pool spread evenly over chunks the text prior did not pick.
        dynamic_weight: stage-2 weight of a dynamic head relative to a static one.
        base_share / layer_share_range: stage-2 parameters (see :func:`hybridkv.budget.allocate`).
        threshold / topk_share / max_dynamic_share: online classification parameters (see
            :mod:`hybridkv.profile`); the offline profile carries its own.
    """

    def __init__(
        self,
        budget: float = 0.1,
        profile: HeadProfile | None = None,
        chunk_size: int = 16,
        pool: float | None = 2.0,
        store: str = "device",
        sink_tokens: int = 4,
        window: int = 8,
        kernel_size: int = 7,
        coverage: float = 0.25,
        dynamic_weight: float = 1.0,
        base_share: float = 0.5,
        layer_share_range: tuple[float, float] = (0.5, 2.0),
        threshold: float = 0.5,
        topk_share: float = 0.1,
        max_dynamic_share: float = 0.5,
    ) -> None:
        super().__init__(budget)
        if profile is not None and not isinstance(profile, HeadProfile):
            raise TypeError(f"profile must be a HeadProfile (HeadProfile.load(path)), got {type(profile).__name__}.")
        if chunk_size < 1 or (pool is not None and pool < 1.0):
            raise ValueError(f"chunk_size must be >= 1 and pool >= 1.0 or None, got {chunk_size}, {pool}.")
        if store not in ("device", "host"):
            raise ValueError(f"store must be 'device' or 'host', got {store!r}.")
        if kernel_size < 1 or kernel_size % 2 == 0 or not 0.0 <= coverage <= 1.0:
            raise ValueError(f"kernel_size must be odd >= 1 and coverage in [0, 1], got {kernel_size}, {coverage}.")
        self.profile, self.chunk_size, self.pool, self.store = profile, chunk_size, pool, store
        self.sink_tokens, self.window, self.kernel_size, self.coverage = sink_tokens, window, kernel_size, coverage
        self.dynamic_weight, self.base_share, self.layer_share_range = dynamic_weight, base_share, layer_share_range
        self.threshold, self.topk_share, self.max_dynamic_share = threshold, topk_share, max_dynamic_share

    def __repr__(self) -> str:
        source = "offline profile" if self.profile is not None else "online"
        return (f"HybridKV(budget={self.budget!r}, {source}, chunk_size={self.chunk_size}, pool={self.pool}, "
                f"store={self.store!r})")

    def apply(self, model: torch.nn.Module, query_tokens: int | None = None):
        """See :meth:`Method.apply`; also refuses a profile made for another model."""
        if self.profile is not None:
            self.profile.check_model(model)
        return super().apply(model, query_tokens)

    # ----------------------------------------------------------------- per prompt
    def begin_prompt(self, spec: ModelSpec, spans: PromptSpans, tokens_per_head: int) -> None:
        """Protected tokens and, with an offline profile, the whole model's budgets."""
        length = spans.prompt_len
        positions = torch.arange(length)
        self.protected = (positions < self.sink_tokens) | ~spans.context | (positions >= length - self.window)
        self.tokens_per_head = tokens_per_head
        self.head_types: list[list[str]] = [[] for _ in range(spec.num_layers)]
        self.memory_budgets = torch.zeros(spec.num_layers, spec.num_kv_heads, dtype=torch.long)
        self.attended_budgets = torch.zeros_like(self.memory_budgets)
        self.pool_chunks = torch.zeros_like(self.memory_budgets)
        if self.profile is not None:
            types = self.profile.head_types
            importance = torch.tensor(self.profile.importance)
            self.memory_budgets = self._allocate(tokens_per_head * spec.num_layers * spec.num_kv_heads, length,
                                                 importance.sum(dim=1), importance, types)
            self.head_types = [list(row) for row in types]

    def _allocate(self, total: int, length: int, layer_importance: torch.Tensor, head_importance: torch.Tensor,
                  types: list[list[str]]) -> torch.Tensor:
        weight = torch.tensor([[self.dynamic_weight if t == "dynamic" else 1.0 for t in row] for row in types])
        return allocate(total, length, int(self.protected.sum()), layer_importance, head_importance, weight,
                        self.layer_share_range, self.base_share).head_budgets

    # ----------------------------------------------------------------- per layer
    def compress(self, ctx: LayerContext, layer: CompressedLayer) -> None:
        """Prune static heads, build the chunk pool of dynamic heads (end of this layer's prefill)."""
        device = ctx.keys.device
        attn = query_attention(ctx.queries, ctx.keys, ctx.spans.query_start, ctx.scaling)  # (Hkv, G, W, L)
        prior = attn.mean(dim=(1, 2))  # (Hkv, L)
        idx = ctx.layer_idx
        if self.profile is None:
            self._classify_online(idx, attn, ctx)
        protected = self.protected.to(device)
        scores = pool_scores(prior, self.kernel_size).masked_fill(protected, float("inf"))
        keep = torch.zeros(ctx.keys.shape[:2], dtype=torch.bool, device=device)
        dynamic = [h for h, t in enumerate(self.head_types[idx]) if t == "dynamic"]
        chunks = []
        for h in range(layer.kv_heads):
            budget = int(self.memory_budgets[idx, h])
            if h not in dynamic or budget >= ctx.spans.prompt_len:
                keep[h] = top_mask(scores[h : h + 1], budget)[0]
                self.attended_budgets[idx, h] = budget
            else:
                keep[h], head_chunks = self._dynamic_head(idx, h, budget, prior[h], protected)
                chunks.append(head_chunks)
        layer.compress(keep)
        if chunks:
            layer.retriever = self._retriever(ctx, chunks, layer.kv_heads)

    def _classify_online(self, idx: int, attn: torch.Tensor, ctx: LayerContext) -> None:
        """Types and budgets of one layer from its prefill: how well the mean text prior predicts
        each individual text-prior query's attention over the context (staticness)."""
        context = ctx.spans.context.to(attn.device)
        per_query = attn[..., context]  # (Hkv, G, W, V)
        per_query = per_query / per_query.sum(-1, keepdim=True).clamp_min(1e-12)
        prior = per_query.mean(dim=(1, 2))
        top = top_prior(prior, self.topk_share)  # (Hkv, k)
        index = top[:, None, None, :].expand(-1, *per_query.shape[1:3], -1)
        staticness = per_query.gather(-1, index).sum(-1).mean(dim=(1, 2))  # (Hkv,)
        self.head_types[idx] = classify(staticness[None].cpu(), self.threshold, self.max_dynamic_share)[0]
        importance = attn.mean(dim=(1, 2))[:, context].sum(-1).cpu()  # context mass of the text prior
        kv_heads = attn.shape[0]
        self.memory_budgets[idx] = self._allocate(self.tokens_per_head * kv_heads, ctx.spans.prompt_len,
                                                  torch.ones(1), importance[None], [self.head_types[idx]])[0]

    def _dynamic_head(self, idx: int, head: int, budget: int, prior: torch.Tensor, protected: torch.Tensor):
        """Always-kept mask (L,) and the pooled chunks (head, positions (P, C), select) of one dynamic head.

        The unprotected tokens are chunked in position order; a partial last chunk is kept
        with the protected tokens when the budget has room for it, else evicted.
        """
        size = self.chunk_size
        rest = (~protected).nonzero().flatten()
        n_chunks = rest.shape[0] // size
        keep = protected.clone()
        tail = rest[n_chunks * size :]
        if int(keep.sum()) + tail.shape[0] <= budget:
            keep[tail] = True
        positions = rest[: n_chunks * size].view(n_chunks, size)  # (n, C) prompt positions
        room = max(0, budget - int(keep.sum()))
        if self.pool is None:
            pooled = torch.arange(n_chunks, device=prior.device)
            select = min(n_chunks, room // size)
        else:
            n_pool = min(n_chunks, room // (size + 1))
            select = min(n_pool, max(1, math.floor(n_pool / self.pool))) if n_pool else 0
            pooled = self._choose_pool(prior[positions].sum(-1), n_pool)
        self.pool_chunks[idx, head] = pooled.shape[0]
        self.attended_budgets[idx, head] = int(keep.sum()) + select * size
        return keep, (head, positions[pooled], select)

    def _choose_pool(self, chunk_prior: torch.Tensor, n_pool: int) -> torch.Tensor:
        """Sorted chunk indices: the top text-prior chunks, then even coverage of the rest."""
        n_prior = n_pool - int(self.coverage * n_pool)
        by_prior = chunk_prior.argsort(descending=True)
        chosen, others = by_prior[:n_prior], by_prior[n_prior:].sort().values
        spread = others[torch.linspace(0, len(others) - 1, n_pool - n_prior).round().long()] if len(others) else others
        return torch.cat([chosen, spread]).unique()

    def _retriever(self, ctx: LayerContext, chunks: list, kv_heads: int) -> ChunkRetriever:
        heads = torch.cat([torch.full((len(pos),), h) for h, pos, _ in chunks])
        positions = torch.cat([pos for _, pos, _ in chunks])  # (M, C)
        select = torch.zeros(kv_heads, dtype=torch.long)
        for h, _, n in chunks:
            select[h] = n
        keys = ctx.keys[heads.to(ctx.keys.device)[:, None], positions]  # (M, C, D)
        values = ctx.values[heads.to(ctx.keys.device)[:, None], positions]
        return ChunkRetriever(keys, values, heads, positions[:, 0], select, self.store)

    def report_extra(self) -> dict:
        """Head types, stage-2 memory budgets, attended budgets and pool sizes per head."""
        return {
            "head_types": self.head_types,
            "profile_source": "offline" if self.profile is not None else "online",
            "memory_budgets": self.memory_budgets.tolist(),
            "attended_budgets": self.attended_budgets.tolist(),
            "pool_chunks": self.pool_chunks.tolist(),
            "chunk_size": self.chunk_size,
            "pool": self.pool,
            "store": self.store,
        }
