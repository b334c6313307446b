"""AdaKV (Feng et al., 2024, "Ada-KV: Optimizing KV Cache Eviction by Adaptive Budget Allocation
for Efficient LLM Inference")."""

from __future__ import annotations

import torch

from hybridkv.methods.base import LayerContext, Method
from hybridkv.scoring import snap_scores, top_mask


class AdaKV(Method):
    """SnapKV scores, but a layer's budget (``tokens_per_head x kv_heads``) is shared among its
    KV heads by one top-k over all heads' scores, so heads whose attention is concentrated
    give slots to heads whose attention is spread. Each head first gets a safeguard minimum of
    ``alpha_safeguard x tokens_per_head`` of its own best tokens. Unlike kvpress, which masks
    evicted keys inside a full-size cache, the evicted entries are freed here.

    Args:
        budget: fraction in (0, 1] of the prompt, or int tokens per KV head on average.
        alpha_safeguard: share of the average head budget every head is guaranteed (0..1).
        window_size / kernel_size: SnapKV scoring parameters (see :class:`SnapKV`).
    """

    def __init__(
        self, budget: float = 0.1, alpha_safeguard: float = 0.2, window_size: int = 64, kernel_size: int = 5
    ) -> None:
        super().__init__(budget)
        if not 0.0 <= alpha_safeguard <= 1.0:
            raise ValueError(f"alpha_safeguard must be in [0, 1], got {alpha_safeguard}.")
        self.alpha_safeguard, self.window_size, self.kernel_size = alpha_safeguard, window_size, kernel_size

    def select(self, ctx: LayerContext) -> torch.Tensor:
        """(Hkv, L) mask with ``tokens_per_head x Hkv`` entries in all, unevenly per head."""
        window = min(self.window_size, ctx.tokens_per_head)  # a budget below the window keeps its newest tokens
        scores = snap_scores(ctx.queries, ctx.keys, window, self.kernel_size, ctx.scaling)
        kv_heads, length = scores.shape
        total = ctx.tokens_per_head * kv_heads
        floor = top_mask(scores, int(self.alpha_safeguard * ctx.tokens_per_head))
        # Safeguarded entries rank first; the rest compete across heads (each head's scores are
        # attention probabilities summing to about 1, so they are comparable).
        ranked = torch.where(floor, torch.full_like(scores, float("inf")), scores)
        flat_keep = torch.zeros(kv_heads * length, dtype=torch.bool, device=scores.device)
        flat_keep[ranked.flatten().topk(total).indices] = True
        return flat_keep.view(kv_heads, length)
