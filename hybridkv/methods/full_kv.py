"""FullKV: keep every token (the reference every method is measured against)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from hybridkv.decisions import LayerContext, Plan
from hybridkv.methods.base import Method
from hybridkv.methods.registry import register


@register
@dataclass(eq=False, kw_only=True)
class FullKV(Method):
    """Keeps the whole prompt in every head; runs through the same engine as the compressing
    methods, so it proves the engine exact (it must reproduce plain ``model.generate``).

    The budget is always 1.0 (it takes no parameter).
    """

    budget: float = field(default=1.0, init=False)

    def select(self, ctx: LayerContext, plan: Plan) -> torch.Tensor:
        """Keep all (Hkv, S) entries."""
        return torch.ones(ctx.keys.shape[:2], dtype=torch.bool, device=ctx.keys.device)
