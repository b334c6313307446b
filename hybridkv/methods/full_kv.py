"""FullKV: keep every token (the reference every method is measured against)."""

from __future__ import annotations

import torch

from hybridkv.methods.base import LayerContext, Method


class FullKV(Method):
    """Keeps the whole prompt in every head; runs through the same engine as the compressing
    methods, so it proves the engine exact (it must reproduce plain ``model.generate``).

    Args:
        budget: ignored except for validation; always 1.0.
    """

    def __init__(self) -> None:
        super().__init__(1.0)

    def select(self, ctx: LayerContext) -> torch.Tensor:
        """Keep all (Hkv, L) entries."""
        return torch.ones(ctx.keys.shape[:2], dtype=torch.bool, device=ctx.keys.device)
