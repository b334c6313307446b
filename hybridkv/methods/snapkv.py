"""SnapKV (Li et al., 2024, "SnapKV: LLM Knows What You are Looking for Before Generation"), and
the scorer the SnapKV family (PyramidKV, AdaKV, SparseMM) shares: those differ only in how many
tokens each KV head keeps (their budget policy, :meth:`SnapKV.head_counts`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hybridkv.decisions import LayerContext, Plan
from hybridkv.methods.base import Method, check_int
from hybridkv.methods.registry import register
from hybridkv.scoring import snap_scores, top_mask


@register
@dataclass(eq=False, kw_only=True)
class SnapKV(Method):
    """Scores tokens by the attention of the last ``window_size`` queries (the observation
    window), averaged over the window and the query heads of a KV group and average-pooled over
    ``kernel_size`` neighbours; every KV head keeps the same number of tokens: the window plus
    the top-scoring rest.

    Args:
        budget: fraction in (0, 1] of the prompt, or int tokens per KV head.
        window_size: observation window (kept, counts against the budget; capped at the
            budget). kvpress uses 64.
        kernel_size: pooling width (odd). kvpress uses 5.
    """

    window_size: int = 64
    kernel_size: int = 5

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("window_size", self.window_size, 1)
        check_int("kernel_size", self.kernel_size, 1)
        if self.kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd (a centred pooling window), got {self.kernel_size}.")

    def window(self, tokens_per_head: int) -> int:
        """Observation-window tokens for a budget of ``tokens_per_head`` (a budget below the
        window keeps its newest tokens)."""
        return min(self.window_size, tokens_per_head)

    def scores(self, ctx: LayerContext) -> torch.Tensor:
        """(Hkv, S) SnapKV scores, +inf on the window."""
        return snap_scores(ctx.queries, ctx.keys, self.window(ctx.tokens_per_head), self.kernel_size, ctx.scaling)

    def head_counts(self, scores: torch.Tensor, ctx: LayerContext, plan: Plan) -> int | torch.Tensor:
        """Tokens each KV head keeps (the budget policy): the same ``tokens_per_head`` for all."""
        return ctx.tokens_per_head

    def select(self, ctx: LayerContext, plan: Plan) -> torch.Tensor:
        """(Hkv, S) mask of each head's best-scoring tokens, as many as :meth:`head_counts` says."""
        scores = self.scores(ctx)
        return top_mask(scores, self.head_counts(scores, ctx, plan))
