"""HybridKV (arXiv 2604.05887, "HybridKV: Hybrid KV Cache Compression for Efficient Multimodal
Large Language Model Inference"), as defined in ``DESIGN.md``.

Stage 1 (:mod:`hybridkv.profile`) types each KV head static or dynamic; stage 2
(:mod:`hybridkv.budget`) splits the memory budget top-down; stage 3 (here) compresses:

* **static heads — text-prior pruning**, once per compression: tokens are scored by the
  text-prior queries' attention (mean over those queries and the GQA group, average-pooled
  over ``kernel_size`` neighbours at text positions and ``visual_kernel_size`` at visual ones:
  a text fact is a longer run of tokens than a visual cell); the head keeps its protected tokens and the best-scoring
  rest of its budget; everything else is freed.
* **dynamic heads — chunk-wise retrieval**: the protected tokens are always kept; the rest is
  cut into chunks of ``chunk_size`` tokens with min/max key summaries
  (:class:`~hybridkv.cache.ChunkPool`); every decoding step attends over the protected tokens
  + the best-scoring chunks that fit the head's attended budget + the generated tokens.

Prompts without a question (``query_tokens=0``, or a multimodal prompt that ends with its
images, compressed before the question arrives: ``PromptSpans.query_source == "none"``) have no
text prior and no question span to protect. There the token scores of both head types come
from ``question_free_prior``: ``"key_diversity"`` (default) keeps the keys least like the head's
mean key (:func:`hybridkv.scoring.key_diversity`: the mean of the ``diversity_anchor`` keys
around each one, or of the whole prompt's; pooled over ``diversity_kernel`` neighbours), ranked
twice: on the cached keys, after RoPE, and on the keys rotated back to position zero
(:mod:`hybridkv.rope`); a head keeps the union of the best ``1 - derotate_share`` (default 0.5)
of the first ranking and the best ``derotate_share`` of the second
(:func:`hybridkv.scoring.union_ranking`; 0.0 is the cached keys alone). After RoPE a single mean
favours a long prompt's ends whatever their content, so late needles are lost; before RoPE a
word repeated all over the prompt looks ordinary, so the counting answers are lost; the union
keeps some of both. Each head then keeps the union of the best ``1 - consensus_share`` of that
ranking and the best ``consensus_share`` (default 0.5) of a model-wide one, every token's mean
place in the rankings of the deepest ``1 - consensus_from`` of the layers: deep layers single out
content (a needle's words and digits) that the keys of middle layers do not, and what the model
found there is what a later question reads at every depth. The engine then compresses the prompt
after its last layer (:attr:`~hybridkv.decisions.Plan.surveys`), not layer by layer.
``"attention"`` the trailing window's attention, as SnapKV does; head types and budgets still
come from the window's attention. ``docs/choices.md`` has the measurement behind the default.

Protected tokens of every head: the first ``sink_tokens``, all text tokens (outside the visual /
context span) and the last ``window`` tokens. When a budget cannot hold them (a short prompt, a
small budget), every head keeps what it must (sinks, the text-prior query span and the window;
without a question, sinks and window), the rest of the text competes with the visual tokens by
score within the budget, dynamic heads act as static ones (no room for chunks), and the report
says by how much the budget was exceeded (``extra["budget_exceeded_tokens"]``).

Memory accounting (why the default pool stays ~10x below the full cache at a 10% budget): a
head's budget from stage 2 is in *memory slots*. A dynamic head spends its slots on protected
tokens and on a retrieval pool; a pooled chunk costs ``chunk_size + 1`` slots (its tokens plus
the min/max summary, the size of one token's K and V). With the device store the pool lives in
the head's own row of the layer and a step attends its picked chunks there; with the host store
the picked chunks are copied to device slots, which cost ``chunk_size`` slots each too. A head
attends per step to ``1 / pool`` of its pool (``pool`` = the pool's size as a multiple of the
attended chunks). The pool is chosen
at compression: ``1 - coverage`` of it by chunk-level text prior, the rest spread evenly over
the remaining chunks (coverage of the rest of the image). ``pool=None`` keeps every chunk
(Quest-like; memory not bounded, meant for ``store="host"``). A head whose budget covers the
whole prompt keeps everything (exact).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from hybridkv.budget import allocate
from hybridkv.decisions import ChunkRequest, Decision, LayerContext, Plan
from hybridkv.head_profile import HeadProfile, classify, top_prior
from hybridkv.methods.base import Method, check_int, check_share
from hybridkv.methods.registry import register
from hybridkv.models.architectures import ModelSpec
from hybridkv.rope import derotate
from hybridkv.scoring import (
    attention_blocks,
    key_diversity,
    mean_attention,
    pool_by_modality,
    pool_scores,
    ranks,
    top_mask,
    union_ranking,
)
from hybridkv.spans import PromptSpans


class HybridKVPlan(Plan):
    """HybridKV's decisions for one prompt (one sequence, one segment).

    Attributes:
        protected: (L,) bool tokens every head keeps when the budget allows.
        must: (L,) bool tokens every head keeps whatever the budget (sinks, query span, window).
        tokens_per_head: the average budget. source: ``"offline"`` or ``"online"``.
        head_types: (layers, kv_heads) ``"static"``/``"dynamic"`` (online: filled layer by layer).
        memory_budgets / attended_budgets / pool_chunks: (layers, kv_heads) long tensors.
        degraded: per layer, True when the budget could not hold the protected tokens.
        question_free: per layer surveyed and not yet compressed, the (Hkv, S) scores its own
            ranking orders tokens by (question-free prompts with a model-wide ranking).
        votes: (S,) summed places (0 = best) of every token in the voting heads' rankings.
        voters: the number of voting heads so far.
    """

    def __init__(self, spec: ModelSpec, protected: torch.Tensor, must: torch.Tensor, tokens_per_head: int,
                 source: str, settings: dict) -> None:
        super().__init__()
        self.protected, self.must, self.tokens_per_head, self.source = protected, must, tokens_per_head, source
        self.settings = settings
        self.head_types: list[list[str]] = [[""] * spec.num_kv_heads for _ in range(spec.num_layers)]
        self.memory_budgets = torch.zeros(spec.num_layers, spec.num_kv_heads, dtype=torch.long)
        self.attended_budgets = torch.zeros_like(self.memory_budgets)
        self.pool_chunks = torch.zeros_like(self.memory_budgets)
        self.degraded = [False] * spec.num_layers
        self.question_free: dict[int, torch.Tensor] = {}
        self.votes: torch.Tensor | float = 0.0
        self.voters = 0

    def report_extra(self) -> dict:
        """Head types, stage-2 memory budgets, attended budgets, pool sizes and budget overruns."""
        return {
            "head_types": self.head_types,
            "profile_source": self.source,
            "memory_budgets": self.memory_budgets.tolist(),
            "attended_budgets": self.attended_budgets.tolist(),
            "pool_chunks": self.pool_chunks.tolist(),
            "budget_exceeded_tokens": sum(self.exceeded.values()),
            "degraded_layers": sum(self.degraded),
            **self.settings,
        }


QUESTION_FREE_PRIORS = ("key_diversity", "attention")
"""Token scores HybridKV can use on a prompt that holds no question."""


@register
@dataclass(eq=False, kw_only=True)
class HybridKV(Method):
    """Hybrid static/dynamic head compression.

    Args:
        budget: fraction in (0, 1] of the prompt's KV (memory slots, all tiers), or int tokens
            per KV head on average.
        profile: a :class:`~hybridkv.head_profile.HeadProfile` of this model (offline stage 1);
            None classifies heads online from the prefill (text-prior queries' disagreement).
        chunk_size: tokens per retrieval chunk (C).
        pool: retrieval pool size as a multiple of a dynamic head's attended chunks, or None
            to keep every chunk.
        store: where dynamic heads' chunks live: ``"device"`` or ``"host"``.
        sink_tokens / window: leading / trailing tokens every head keeps.
        kernel_size: pooling width of text-prior scores at text positions (odd).
        visual_kernel_size: pooling width of text-prior scores at visual positions (odd).
        coverage: share of the pool spread evenly over chunks the text prior did not pick.
        dynamic_weight: stage-2 weight of a dynamic head relative to a static one.
        base_share / layer_share_range: stage-2 parameters (see :func:`hybridkv.budget.allocate`).
        threshold / topk_share / max_dynamic_share: online classification parameters (see
            :mod:`hybridkv.profile`); the offline profile carries its own.
        question_free_prior: token scores of a prompt that holds no question:
            ``"key_diversity"`` or ``"attention"`` (see the module docstring).
        diversity_kernel: pooling width of key-diversity scores (odd).
        diversity_anchor: keys whose mean a key's diversity is measured against (a window
            centred on it), or None for the whole prompt's mean.
        derotate_share: share in [0, 1] of a question-free head's ranked tokens chosen by key
            diversity of the keys with their RoPE undone
            (:attr:`~hybridkv.decisions.LayerContext.rotation`), the rest by that of the cached
            keys; where the rotation is unknown (a later turn's segment), the cached keys alone.
        consensus_share: share in [0, 1] of a question-free head's ranked tokens chosen by the
            model-wide ranking of the voting layers (0: each head's own ranking alone, compressed
            layer by layer).
        consensus_from: share of the model's depth in [0, 1) where the voting layers start
            (0.5: the deeper half votes).
    """

    profile: HeadProfile | None = None
    chunk_size: int = 16
    pool: float | None = 2.0
    store: str = "device"
    sink_tokens: int = 4
    window: int = 8
    kernel_size: int = 15
    visual_kernel_size: int = 7
    coverage: float = 0.25
    dynamic_weight: float = 1.0
    base_share: float = 0.5
    layer_share_range: tuple[float, float] = (0.5, 2.0)
    threshold: float = 0.5
    topk_share: float = 0.1
    max_dynamic_share: float = 0.5
    question_free_prior: str = "key_diversity"
    diversity_kernel: int = 3
    diversity_anchor: int | None = None
    derotate_share: float = 0.5
    consensus_share: float = 0.5
    consensus_from: float = 0.5

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.profile is not None and not isinstance(self.profile, HeadProfile):
            raise TypeError(f"profile must be a HeadProfile (HeadProfile.load(path)), got {type(self.profile).__name__}.")
        check_int("chunk_size", self.chunk_size, 1)
        check_int("sink_tokens", self.sink_tokens, 0)
        check_int("window", self.window, 0)
        for name in ("kernel_size", "visual_kernel_size", "diversity_kernel"):
            check_int(name, getattr(self, name), 1)
            if getattr(self, name) % 2 == 0:
                raise ValueError(f"{name} must be odd (a centred pooling window), got {getattr(self, name)}.")
        if self.diversity_anchor is not None:
            check_int("diversity_anchor", self.diversity_anchor, 1)
        if self.pool is not None and (isinstance(self.pool, bool) or not isinstance(self.pool, (int, float))
                                      or self.pool < 1.0):
            raise ValueError(f"pool must be a number >= 1.0 (pool size / attended chunks) or None, got {self.pool!r}.")
        if self.question_free_prior not in QUESTION_FREE_PRIORS:
            raise ValueError(f"question_free_prior must be one of {QUESTION_FREE_PRIORS}, got {self.question_free_prior!r}.")
        if self.store not in ("device", "host"):
            raise ValueError(f"store must be 'device' or 'host', got {self.store!r}.")
        for name in ("coverage", "base_share", "topk_share", "max_dynamic_share", "derotate_share", "consensus_share",
                     "consensus_from"):
            check_share(name, getattr(self, name))
        if self.consensus_from == 1.0:
            raise ValueError("consensus_from must be below 1.0 (the share of the depth where the voting layers start); "
                             "turn the model-wide ranking off with consensus_share=0.0.")
        low, high = self.layer_share_range
        if not 0.0 <= low <= 1.0 <= high:
            raise ValueError(f"layer_share_range must be (min <= 1 <= max) multiples of the uniform share, "
                             f"got {self.layer_share_range}.")
        if self.dynamic_weight <= 0:
            raise ValueError(f"dynamic_weight must be > 0, got {self.dynamic_weight}.")

    def __repr__(self) -> str:
        source = "offline profile" if self.profile is not None else "online"
        return (f"HybridKV(budget={self.budget!r}, {source}, chunk_size={self.chunk_size}, pool={self.pool}, "
                f"store={self.store!r})")

    def check_model(self, model: torch.nn.Module) -> None:
        """Refuse a profile made for another model."""
        if self.profile is not None:
            self.profile.check_model(model)

    # ----------------------------------------------------------------- per prompt
    def plan(self, spec: ModelSpec, spans: PromptSpans, tokens_per_head: int) -> HybridKVPlan:
        """Protected tokens and, with an offline profile, the whole model's budgets."""
        length = spans.prompt_len
        positions = torch.arange(length)
        no_question = spans.query_source == "none"
        question = torch.zeros(length, dtype=torch.bool) if no_question else positions >= spans.query_start
        must = (positions < self.sink_tokens) | (positions >= length - self.window) | question
        protected = must | ~spans.context
        settings = {"chunk_size": self.chunk_size, "pool": self.pool, "store": self.store,
                    "token_prior": self.question_free_prior if no_question else "text_prior"}
        plan = HybridKVPlan(spec, protected, must, tokens_per_head, "offline" if self.profile else "online", settings)
        plan.surveys = settings["token_prior"] == "key_diversity" and self.consensus_share > 0.0
        if self.profile is not None:
            plan.head_types = [list(row) for row in self.profile.head_types]
            importance = torch.tensor(self.profile.importance)
            total = tokens_per_head * spec.num_layers * spec.num_kv_heads
            if total >= int(protected.sum()) * spec.num_layers * spec.num_kv_heads:
                plan.memory_budgets = self._allocate(total, length, int(protected.sum()), importance.sum(dim=1),
                                                     importance, plan.head_types)
            else:
                plan.memory_budgets.fill_(tokens_per_head)
                plan.degraded = [True] * spec.num_layers
        return plan

    def _allocate(self, total: int, length: int, protected: int, layer_importance: torch.Tensor,
                  head_importance: torch.Tensor, types: list[list[str]]) -> torch.Tensor:
        weight = torch.tensor([[self.dynamic_weight if t == "dynamic" else 1.0 for t in row] for row in types])
        return allocate(total, length, protected, layer_importance, head_importance, weight,
                        self.layer_share_range, self.base_share).head_budgets

    # ----------------------------------------------------------------- per layer
    def compress(self, ctx: LayerContext, plan: HybridKVPlan) -> Decision:
        """Prune static heads, build the chunk pools of dynamic heads."""
        device = ctx.keys.device
        length = ctx.keys.shape[1]
        start = ctx.prior_row
        prior = mean_attention(ctx.queries, ctx.keys, start, ctx.scaling)  # (Hkv, S)
        idx = ctx.layer_idx
        if plan.source == "online":
            self._classify_online(ctx, plan, prior, start)
        if plan.settings["token_prior"] == "key_diversity":
            prior, pooled = self.question_free_scores(ctx, plan)
        else:
            pooled = pool_by_modality(prior, ctx.spans.visual, self.kernel_size, self.visual_kernel_size)
        degraded = plan.degraded[idx]
        fixed = (plan.must if degraded else plan.protected).to(device)
        scores = pooled.masked_fill(fixed, float("inf"))
        keep = torch.zeros(ctx.keys.shape[:2], dtype=torch.bool, device=device)
        chunks = []
        for h in range(ctx.keys.shape[0]):
            budget = int(plan.memory_budgets[idx, h])
            if degraded or plan.head_types[idx][h] != "dynamic" or budget >= length:
                count = max(budget, int(fixed.sum()))
                keep[h] = top_mask(scores[h : h + 1], count)[0]
                plan.attended_budgets[idx, h] = count
                plan.exceeded[idx] = plan.exceeded.get(idx, 0) + max(0, count - budget)
            else:
                keep[h], request = self._dynamic_head(idx, h, budget, prior[h], fixed, plan)
                chunks.append(request)
        return Decision(keep, chunks, store=self.store)

    def survey(self, ctx: LayerContext, plan: HybridKVPlan) -> None:
        """Rank a question-free layer before any is compressed; a voting layer's heads add their
        places to the model-wide ranking."""
        own = self.key_diversity_scores(ctx)[1]
        plan.question_free[ctx.layer_idx] = own
        if ctx.layer_idx >= int(self.consensus_from * ctx.spec.num_layers):
            plan.votes = plan.votes + ranks(own).sum(dim=0)
            plan.voters += own.shape[0]

    def question_free_scores(self, ctx: LayerContext, plan: HybridKVPlan) -> tuple[torch.Tensor, torch.Tensor]:
        """Scores of a prompt without a question: (Hkv, S) that chunk pools sum and (Hkv, S) that
        tokens are ranked by; with a model-wide ranking, the union of the head's own with it
        (both times)."""
        if not plan.surveys:
            return self.key_diversity_scores(ctx)
        own = plan.question_free.pop(ctx.layer_idx)
        consensus = (-plan.votes / plan.voters).to(own.device).expand_as(own)
        if self.consensus_share == 1.0:
            return consensus, consensus
        union = union_ranking(own, consensus, self.consensus_share)
        return union, union

    def key_diversity_scores(self, ctx: LayerContext) -> tuple[torch.Tensor, torch.Tensor]:
        """Question-free scores of one layer: (Hkv, S) that chunk pools sum and (Hkv, S) that
        tokens are ranked by. From one ranking, its key diversity and that pooled over
        ``diversity_kernel``; from two, their union of the pooled scores, both times."""
        share = self.derotate_share if ctx.rotation is not None else 0.0
        if share in (0.0, 1.0):
            keys = derotate(ctx.keys, *ctx.rotation) if share == 1.0 else ctx.keys
            prior = key_diversity(keys, self.diversity_anchor)
            return prior, pool_scores(prior, self.diversity_kernel)
        rotated, derotated = (pool_scores(key_diversity(keys, self.diversity_anchor), self.diversity_kernel)
                              for keys in (ctx.keys, derotate(ctx.keys, *ctx.rotation)))
        union = union_ranking(rotated, derotated, share)
        return union, union

    def _classify_online(self, ctx: LayerContext, plan: HybridKVPlan, prior: torch.Tensor, start: int) -> None:
        """Types and budgets of one layer from its prefill: how well the mean text prior predicts
        each individual text-prior query's attention over the context (staticness)."""
        context = ctx.spans.context.to(prior.device)
        kv_heads = ctx.keys.shape[0]
        idx = ctx.layer_idx
        if not bool(context.any()):  # nothing to classify: every head static
            plan.head_types[idx] = ["static"] * kv_heads
            importance = torch.ones(kv_heads)
        else:
            mean = prior[:, context]
            top = top_prior(mean / mean.sum(-1, keepdim=True).clamp_min(1e-12), self.topk_share)  # (Hkv, k)
            captured, rows = torch.zeros(kv_heads, device=prior.device), 0
            for _, probs in attention_blocks(ctx.queries, ctx.keys, start, ctx.scaling):
                per_query = probs[..., context]  # (Hkv, G, W, V)
                hit = per_query.gather(-1, top[:, None, None, :].expand(*per_query.shape[:3], -1)).sum(-1)
                captured += (hit / per_query.sum(-1).clamp_min(1e-12)).sum(dim=(1, 2))
                rows += per_query.shape[1] * per_query.shape[2]
            staticness = captured / max(1, rows)
            plan.head_types[idx] = classify(staticness[None].cpu(), self.threshold, self.max_dynamic_share)[0]
            importance = mean.sum(-1).cpu()  # context mass of the text prior
        protected = int(plan.protected.sum())
        total = plan.tokens_per_head * kv_heads
        if total >= protected * kv_heads:
            plan.memory_budgets[idx] = self._allocate(total, ctx.spans.prompt_len, protected, torch.ones(1),
                                                      importance[None], [plan.head_types[idx]])[0]
        else:
            plan.memory_budgets[idx] = plan.tokens_per_head
            plan.degraded[idx] = True

    def _dynamic_head(self, idx: int, head: int, budget: int, prior: torch.Tensor, protected: torch.Tensor,
                      plan: HybridKVPlan) -> tuple[torch.Tensor, ChunkRequest]:
        """Always-kept mask (S,) and the chunk pool of one dynamic head.

        The unprotected tokens are chunked in position order; a partial last chunk is kept
        with the protected tokens when the budget has room for it, else evicted. The budget
        pays for the kept tokens, the pool (``C + 1`` per chunk) and, with the host store, the
        device slots the picked chunks are copied to (``select x C``).
        """
        size = self.chunk_size
        rest = (~protected).nonzero().flatten()
        n_chunks = rest.shape[0] // size
        keep = protected.clone()
        partial = rest[n_chunks * size :]
        if int(keep.sum()) + partial.shape[0] <= budget:
            keep[partial] = True
        positions = rest[: n_chunks * size].view(n_chunks, size)  # (n, C) positions
        room = max(0, budget - int(keep.sum()))
        if self.pool is None:
            pooled = torch.arange(n_chunks, device=prior.device)
            select = min(n_chunks, room // size)
        else:
            slot = size if self.store == "host" else 0  # host pools are read through retrieval slots
            n_pool = min(n_chunks, math.floor(room / (size + 1 + slot / self.pool)))
            select = min(n_pool, max(1, math.floor(n_pool / self.pool))) if n_pool else 0
            while n_pool and n_pool * (size + 1) + select * slot > room:
                n_pool -= 1
                select = min(n_pool, max(1, math.floor(n_pool / self.pool))) if n_pool else 0
            pooled = self._choose_pool(prior[positions].sum(-1), n_pool)
        plan.pool_chunks[idx, head] = pooled.shape[0]
        plan.attended_budgets[idx, head] = int(keep.sum()) + select * size
        return keep, ChunkRequest(head, positions[pooled], select)

    def _choose_pool(self, chunk_prior: torch.Tensor, n_pool: int) -> torch.Tensor:
        """Sorted chunk indices: the top text-prior chunks, then even coverage of the rest."""
        n_prior = n_pool - int(self.coverage * n_pool)
        by_prior = chunk_prior.argsort(descending=True)
        chosen, others = by_prior[:n_prior], by_prior[n_prior:].sort().values
        spread = others[torch.linspace(0, len(others) - 1, n_pool - n_prior).round().long()] if len(others) else others
        return torch.cat([chosen, spread]).unique()
