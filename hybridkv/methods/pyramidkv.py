"""PyramidKV (Cai et al., 2024, "PyramidKV: Dynamic KV Cache Compression based on Pyramidal
Information Funneling")."""

from __future__ import annotations

import math

import torch

from hybridkv.methods.base import LayerContext, Method
from hybridkv.models.architectures import ModelSpec
from hybridkv.scoring import snap_scores, top_mask
from hybridkv.spans import PromptSpans


def pyramid_budgets(layers: int, tokens_per_head: int, prompt_len: int, window: int, beta: float) -> list[int]:
    """Per-layer tokens per KV head, decreasing linearly with depth (the paper's schedule).

    Outside the observation window (kept by every layer), the layer budgets form an arithmetic
    sequence whose mean is ``tokens_per_head - window``: the top (last) layer gets
    ``mean / beta``, the bottom layer ``2 x mean - top``. When the bottom layer would exceed
    the prompt, it is set to the prompt and the top layer to ``2 x mean - bottom`` (the
    sequence flattens, keeping its mean). Values are rounded down, so the sum never exceeds
    ``layers x tokens_per_head``.

    Args:
        layers: decoder layers. tokens_per_head: the average budget (<= ``prompt_len``).
        prompt_len: L. window: observation-window tokens every layer keeps (<= the budget).
        beta: >= 1; 1 gives every layer the same budget.
    Returns:
        ``layers`` ints, non-increasing, each in ``[window, prompt_len]``.
    """
    mean = tokens_per_head - window
    room = prompt_len - window
    top = mean / beta
    bottom = 2 * mean - top
    if bottom > room:
        bottom, top = room, 2 * mean - room
    if layers == 1:
        return [tokens_per_head]
    step = (bottom - top) / (layers - 1)
    # the 1e-9 keeps budgets that are exact integers (e.g. the whole prompt) from rounding down
    return [window + min(room, math.floor(bottom - step * layer + 1e-9)) for layer in range(layers)]


class PyramidKV(Method):
    """Layer budgets shrink linearly with depth (lower layers attend broadly, higher layers
    focus on few tokens: "pyramidal information funneling"); inside a layer every KV head
    keeps the same number of tokens, chosen by SnapKV scores (the observation window's
    attention, pooled over neighbours; see :class:`~hybridkv.methods.snapkv.SnapKV`). The
    layer budgets' mean is the budget (see :func:`pyramid_budgets`).

    Args:
        budget: fraction in (0, 1] of the prompt, or int tokens per KV head on average over
            the layers.
        beta: the top layer keeps ``1 / beta`` of the average budget outside the window, the
            bottom layer ``2 - 1 / beta`` of it (bottom/top ratio ``2 beta - 1``). The paper
            and kvpress use 20; 1 is SnapKV.
        window_size: observation window (kept by every layer, counts against the budget;
            capped at the budget). kvpress uses 64.
        kernel_size: SnapKV pooling width (odd). kvpress uses 5.
    """

    def __init__(
        self, budget: float = 0.1, beta: float = 20.0, window_size: int = 64, kernel_size: int = 5
    ) -> None:
        super().__init__(budget)
        if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not beta >= 1.0:
            raise ValueError(f"beta must be a number >= 1 (1: equal layer budgets; the paper uses 20), got {beta!r}.")
        if window_size < 1 or kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"window_size must be >= 1 and kernel_size odd >= 1, got {window_size}, {kernel_size}.")
        self.beta, self.window_size, self.kernel_size = float(beta), window_size, kernel_size

    def begin_prompt(self, spec: ModelSpec, spans: PromptSpans, tokens_per_head: int) -> None:
        """The per-layer budgets of this prompt."""
        self.window = min(self.window_size, tokens_per_head)
        self.layer_budgets = pyramid_budgets(spec.num_layers, tokens_per_head, spans.prompt_len, self.window, self.beta)

    def select(self, ctx: LayerContext) -> torch.Tensor:
        """(Hkv, L) mask: the window plus the best SnapKV scores, this layer's budget per head."""
        scores = snap_scores(ctx.queries, ctx.keys, self.window, self.kernel_size, ctx.scaling)
        return top_mask(scores, self.layer_budgets[ctx.layer_idx])

    def report_extra(self) -> dict:
        """Tokens per KV head of every layer, and the window kept by each."""
        return {"layer_tokens_per_head": list(self.layer_budgets), "window": self.window, "beta": self.beta}
