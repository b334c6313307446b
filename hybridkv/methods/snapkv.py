"""SnapKV (Li et al., 2024, "SnapKV: LLM Knows What You are Looking for Before Generation")."""

from __future__ import annotations

import torch

from hybridkv.methods.base import LayerContext, Method
from hybridkv.scoring import snap_scores, top_mask


class SnapKV(Method):
    """Scores prompt tokens by the attention of the last ``window_size`` prompt queries
    (the observation window), averaged over the window and the query heads of a KV group and
    average-pooled over ``kernel_size`` neighbours; every KV head keeps the same number of
    tokens: the window plus the top-scoring rest.

    Args:
        budget: fraction in (0, 1] of the prompt, or int tokens per KV head.
        window_size: observation window (kept, counts against the budget). kvpress uses 64.
        kernel_size: pooling width (odd). kvpress uses 5.
    """

    def __init__(self, budget: float = 0.1, window_size: int = 64, kernel_size: int = 5) -> None:
        super().__init__(budget)
        if window_size < 1 or kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"window_size must be >= 1 and kernel_size odd >= 1, got {window_size}, {kernel_size}.")
        self.window_size, self.kernel_size = window_size, kernel_size

    def select(self, ctx: LayerContext) -> torch.Tensor:
        """(Hkv, L) mask of the ``tokens_per_head`` best-scoring tokens of each head."""
        window = min(self.window_size, ctx.tokens_per_head)  # a budget below the window keeps its newest tokens
        scores = snap_scores(ctx.queries, ctx.keys, window, self.kernel_size, ctx.scaling)
        return top_mask(scores, ctx.tokens_per_head)
