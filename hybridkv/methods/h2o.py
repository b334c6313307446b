"""H2O (Zhang et al., 2023, "H2O: Heavy-Hitter Oracle for Efficient Generative Inference of Large
Language Models")."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hybridkv.decisions import LayerContext, Plan
from hybridkv.methods.base import Method
from hybridkv.methods.registry import register
from hybridkv.models.architectures import ModelSpec
from hybridkv.scoring import column_sums, top_mask
from hybridkv.spans import PromptSpans


@register
@dataclass(eq=False, kw_only=True)
class H2O(Method):
    """Keeps each head's recent window plus its *heavy hitters*: the tokens with the largest
    attention accumulated over all queries of the forward, i.e. the column sums of the causal
    attention matrix (averaged over the query heads of a GQA group), as in the paper.

    Eviction happens once, at the end of prefill (as kvpress's ``ObservedAttentionPress``
    does), not greedily at every decoding step as in the paper: generated tokens are all kept.
    Unlike kvpress, which needs eager attention and the whole (Hq, L, L) matrix, the column
    sums are accumulated over blocks of query rows (:mod:`hybridkv.scoring`).

    Args:
        budget: fraction in (0, 1] of the prompt, or int tokens per KV head.
        recent_window: the most recent tokens every head keeps (they count against the budget):
            a float in [0, 1] is a share of the head's budget (the paper splits the budget
            evenly, 0.5), an int is a number of tokens (capped at the budget).
    """

    recent_window: float | int = 0.5

    def __post_init__(self) -> None:
        super().__post_init__()
        window = self.recent_window
        if isinstance(window, bool) or not isinstance(window, (int, float)):
            raise TypeError(f"recent_window must be a float share in [0, 1] or an int number of tokens, got {window!r}.")
        if (isinstance(window, float) and not 0.0 <= window <= 1.0) or window < 0:
            raise ValueError(f"recent_window={window} must be a share of the budget in [0, 1] (float) or >= 0 tokens (int).")

    def recent_tokens(self, tokens_per_head: int) -> int:
        """Recent tokens every head keeps for a budget of ``tokens_per_head``."""
        if isinstance(self.recent_window, float):
            return round(self.recent_window * tokens_per_head)
        return min(self.recent_window, tokens_per_head)

    def plan(self, spec: ModelSpec, spans: PromptSpans, tokens_per_head: int) -> Plan:
        """The recent tokens every head keeps (reported)."""
        return Plan(recent_tokens=self.recent_tokens(tokens_per_head))

    def select(self, ctx: LayerContext, plan: Plan) -> torch.Tensor:
        """(Hkv, S) mask: the recent window plus the heaviest hitters, ``tokens_per_head`` in all."""
        length = ctx.keys.shape[1]
        key = ("column_sums", ctx.layer_idx, tuple(ctx.queries.shape), tuple(ctx.keys.shape), ctx.scaling)
        if ctx.memo is not None and key in ctx.memo:
            scores = ctx.memo[key].clone()
        else:
            scores = column_sums(ctx.queries, ctx.keys, ctx.scaling)
            if ctx.memo is not None:
                ctx.memo[key] = scores.clone()
        scores[:, length - self.recent_tokens(ctx.tokens_per_head) :] = float("inf")
        return top_mask(scores, ctx.tokens_per_head)
