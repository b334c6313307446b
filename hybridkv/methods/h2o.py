"""H2O (Zhang et al., 2023, "H2O: Heavy-Hitter Oracle for Efficient Generative Inference of Large
Language Models")."""

from __future__ import annotations

import torch

from hybridkv.methods.base import LayerContext, Method
from hybridkv.models.architectures import ModelSpec
from hybridkv.scoring import query_attention, top_mask
from hybridkv.spans import PromptSpans


class H2O(Method):
    """Keeps each head's recent window plus its *heavy hitters*: the prompt tokens with the
    largest attention accumulated over all prompt queries, i.e. the column sums of the causal
    prompt attention matrix (averaged over the query heads of a GQA group), as in the paper.

    Eviction happens once, at the end of prefill (as kvpress's ``ObservedAttentionPress``
    does), not greedily at every decoding step as in the paper: generated tokens are all kept.
    Unlike kvpress, which needs eager attention and the whole (Hq, L, L) matrix, the column
    sums are accumulated over blocks of ``block_size`` query rows, so at most
    (Hq, block_size, L) attention probabilities exist at a time.

    Args:
        budget: fraction in (0, 1] of the prompt, or int tokens per KV head.
        recent_window: the most recent prompt tokens every head keeps (they count against the
            budget): a float in [0, 1] is a share of the head's budget (the paper splits the
            budget evenly, 0.5), an int is a number of tokens (capped at the budget).
        block_size: query rows per block when accumulating the column sums; bounds the
            transient memory to ``Hq x block_size x L`` float32 values.
    """

    def __init__(self, budget: float = 0.1, recent_window: float = 0.5, block_size: int = 256) -> None:
        super().__init__(budget)
        if isinstance(recent_window, bool) or not isinstance(recent_window, (int, float)):
            raise TypeError(
                f"recent_window must be a float share in [0, 1] or an int number of tokens, got {recent_window!r}."
            )
        if (isinstance(recent_window, float) and not 0.0 <= recent_window <= 1.0) or recent_window < 0:
            raise ValueError(
                f"recent_window={recent_window} must be a share of the budget in [0, 1] (float) or >= 0 tokens (int)."
            )
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"block_size must be an int >= 1 query rows, got {block_size!r}.")
        self.recent_window, self.block_size = recent_window, block_size

    def begin_prompt(self, spec: ModelSpec, spans: PromptSpans, tokens_per_head: int) -> None:
        """Number of recent tokens every head keeps for this prompt."""
        if isinstance(self.recent_window, float):
            self.recent_tokens = round(self.recent_window * tokens_per_head)
        else:
            self.recent_tokens = min(self.recent_window, tokens_per_head)

    def heavy_hitter_scores(self, ctx: LayerContext) -> torch.Tensor:
        """(Hkv, L) float32 attention each prompt token receives from all prompt queries (column
        sums of the causal attention matrix), mean over the query heads of each group."""
        length = ctx.keys.shape[1]
        scores = torch.zeros(ctx.keys.shape[:2], dtype=torch.float32, device=ctx.keys.device)
        for start in range(0, length, self.block_size):
            end = min(start + self.block_size, length)  # rows [start, end) only see keys [0, end)
            attn = query_attention(ctx.queries[:, :end], ctx.keys[:, :end], start, ctx.scaling)  # (Hkv, G, B, end)
            scores[:, :end] += attn.sum(dim=2).mean(dim=1)
        return scores

    def select(self, ctx: LayerContext) -> torch.Tensor:
        """(Hkv, L) mask: the recent window plus the heaviest hitters, ``tokens_per_head`` in all."""
        length = ctx.keys.shape[1]
        scores = self.heavy_hitter_scores(ctx)
        scores[:, length - self.recent_tokens :] = float("inf")
        return top_mask(scores, ctx.tokens_per_head)

    def report_extra(self) -> dict:
        """Recent tokens kept per head (the rest of each head's budget are heavy hitters)."""
        return {"recent_tokens": self.recent_tokens}
