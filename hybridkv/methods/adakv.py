"""AdaKV (Feng et al., 2024, "Ada-KV: Optimizing KV Cache Eviction by Adaptive Budget Allocation
for Efficient LLM Inference")."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hybridkv.decisions import LayerContext, Plan
from hybridkv.methods.base import check_share
from hybridkv.methods.registry import register
from hybridkv.methods.snapkv import SnapKV


@register
@dataclass(eq=False, kw_only=True)
class AdaKV(SnapKV):
    """SnapKV scores, but a layer's budget (``tokens_per_head x kv_heads``) is shared among its
    KV heads by one top-k over all heads' scores, so heads whose attention is concentrated
    give slots to heads whose attention is spread. Each head first gets a safeguard minimum of
    ``alpha_safeguard x tokens_per_head`` of its own best tokens. Unlike kvpress, which masks
    evicted keys inside a full-size cache, the evicted entries are freed here.

    Args:
        budget: fraction in (0, 1] of the prompt, or int tokens per KV head on average.
        window_size / kernel_size: SnapKV's (see :class:`~hybridkv.methods.snapkv.SnapKV`).
        alpha_safeguard: share of the average head budget every head is guaranteed (0..1).
    """

    alpha_safeguard: float = 0.2

    def __post_init__(self) -> None:
        super().__post_init__()
        check_share("alpha_safeguard", self.alpha_safeguard)

    def head_counts(self, scores: torch.Tensor, ctx: LayerContext, plan: Plan) -> torch.Tensor:
        """(Hkv,) tokens per head: each head's safeguard, then the layer's best remaining scores.

        Every head's scores are attention probabilities summing to about 1, so they compare
        across heads; the safeguarded entries rank first.
        """
        kv_heads, length = scores.shape
        floor = int(self.alpha_safeguard * ctx.tokens_per_head)
        safe = torch.zeros_like(scores, dtype=torch.bool)
        safe.scatter_(1, scores.topk(min(floor, length), dim=1).indices, True)
        ranked = torch.where(safe, torch.full_like(scores, float("inf")), scores)
        chosen = ranked.flatten().topk(min(ctx.tokens_per_head * kv_heads, ranked.numel())).indices
        return torch.bincount(chosen // length, minlength=kv_heads)
