"""StreamingLLM (Xiao et al., 2023, "Efficient Streaming Language Models with Attention Sinks")."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hybridkv.decisions import LayerContext, Plan
from hybridkv.methods.base import Method, check_int
from hybridkv.methods.registry import register


@register
@dataclass(eq=False, kw_only=True)
class StreamingLLM(Method):
    """Keeps the first ``sink_tokens`` prompt tokens (attention sinks) and the most recent ones,
    the same in every head.

    Args:
        budget: fraction in (0, 1] of the prompt, or int tokens per KV head.
        sink_tokens: leading tokens always kept (the paper uses 4); counts against the budget.
    """

    sink_tokens: int = 4

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("sink_tokens", self.sink_tokens, 0)

    def select(self, ctx: LayerContext, plan: Plan) -> torch.Tensor:
        """(Hkv, S) mask: sinks + the most recent tokens, ``tokens_per_head`` in all."""
        kv_heads, length = ctx.keys.shape[:2]
        n = ctx.tokens_per_head
        sinks = min(self.sink_tokens, n)
        positions = torch.arange(length, device=ctx.keys.device)
        keep = (positions < sinks) | (positions >= length - (n - sinks))
        return keep.expand(kv_heads, length).clone()
