"""PyramidKV (Cai et al., 2024, "PyramidKV: Dynamic KV Cache Compression based on Pyramidal
Information Funneling")."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from hybridkv.decisions import LayerContext, Plan
from hybridkv.methods.registry import register
from hybridkv.methods.snapkv import SnapKV
from hybridkv.models.architectures import ModelSpec
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


@register
@dataclass(eq=False, kw_only=True)
class PyramidKV(SnapKV):
    """SnapKV scores with layer budgets that shrink linearly with depth (lower layers attend
    broadly, higher layers focus on few tokens: "pyramidal information funneling"); inside a
    layer every KV head keeps the same number of tokens. The layer budgets' mean is the budget
    (see :func:`pyramid_budgets`).

    Args:
        budget: fraction in (0, 1] of the prompt, or int tokens per KV head on average over
            the layers.
        window_size / kernel_size: SnapKV's (see :class:`~hybridkv.methods.snapkv.SnapKV`).
        beta: the top layer keeps ``1 / beta`` of the average budget outside the window, the
            bottom layer ``2 - 1 / beta`` of it (bottom/top ratio ``2 beta - 1``). The paper
            and kvpress use 20; 1 is SnapKV.
    """

    beta: float = 20.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.beta, bool) or not isinstance(self.beta, (int, float)) or not self.beta >= 1.0:
            raise ValueError(f"beta must be a number >= 1 (1: equal layer budgets; the paper uses 20), got {self.beta!r}.")
        self.beta = float(self.beta)

    def plan(self, spec: ModelSpec, spans: PromptSpans, tokens_per_head: int) -> Plan:
        """The per-layer budgets of this prompt."""
        window = self.window(tokens_per_head)
        budgets = pyramid_budgets(spec.num_layers, tokens_per_head, spans.prompt_len, window, self.beta)
        return Plan(layer_tokens_per_head=budgets, window=window, beta=self.beta)

    def head_counts(self, scores: torch.Tensor, ctx: LayerContext, plan: Plan) -> int:
        """This layer's budget, the same for every head."""
        return plan.extra["layer_tokens_per_head"][ctx.layer_idx]
