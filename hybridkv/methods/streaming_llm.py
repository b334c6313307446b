"""StreamingLLM (Xiao et al., 2023, "Efficient Streaming Language Models with Attention Sinks")."""

from __future__ import annotations

import torch

from hybridkv.methods.base import LayerContext, Method


class StreamingLLM(Method):
    """Keeps the first ``sink_tokens`` prompt tokens (attention sinks) and the most recent ones,
    the same in every head.

    Args:
        budget: fraction in (0, 1] of the prompt, or int tokens per KV head.
        sink_tokens: leading tokens always kept (the paper uses 4); counts against the budget.
    """

    def __init__(self, budget: float = 0.1, sink_tokens: int = 4) -> None:
        super().__init__(budget)
        if sink_tokens < 0:
            raise ValueError(f"sink_tokens must be >= 0, got {sink_tokens}.")
        self.sink_tokens = sink_tokens

    def select(self, ctx: LayerContext) -> torch.Tensor:
        """(Hkv, L) mask: sinks + the most recent tokens, ``tokens_per_head`` in all."""
        kv_heads, length = ctx.keys.shape[:2]
        n = ctx.tokens_per_head
        sinks = min(self.sink_tokens, n)
        positions = torch.arange(length, device=ctx.keys.device)
        keep = (positions < sinks) | (positions >= length - (n - sinks))
        return keep.expand(kv_heads, length).clone()
