"""Quest (Tang et al., 2024, "Quest: Query-Aware Sparsity for Efficient Long-Context LLM
Inference")."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hybridkv.decisions import ChunkRequest, Decision, LayerContext, Plan
from hybridkv.methods.base import Method, check_int
from hybridkv.methods.registry import register
from hybridkv.models.architectures import ModelSpec
from hybridkv.spans import PromptSpans


@register
@dataclass(eq=False, kw_only=True)
class Quest(Method):
    """Query-aware page retrieval without eviction: the whole prompt KV is kept, cut into pages of
    ``page_size`` consecutive tokens with channel-wise min/max key bounds. Every decoding step,
    each KV head attends over the pages with the highest upper bound of ``q . k``
    (``sum_d max(q_d min_d, q_d max_d)``), as many as fit its budget, plus the prompt's last
    partial page (the ``L mod page_size`` trailing tokens, always attended) and every generated
    token. The pages and their selection are :class:`~hybridkv.cache.ChunkPool`'s (shared
    with HybridKV's dynamic heads).

    The budget bounds the prompt tokens a head *attends* per step (the trailing partial page
    counts against it), not the memory: all pages stay stored (on the device, or in host memory
    with ``store="host"``). Differences from the paper: pages cover the prompt only (generated
    tokens are always attended rather than paged), and with grouped-query attention a KV head
    selects once for its query heads, scoring a page by the maximum bound over the group (the
    paper selects per query head of multi-head models).

    Args:
        budget: fraction in (0, 1] of the prompt, or int prompt tokens attended per KV head and
            step.
        page_size: tokens per page (the paper uses 16).
        store: where the pages live: ``"device"`` (the paper) or ``"host"`` (only the selected
            pages are copied to the device each step).
        dense_layers: the first ``dense_layers`` layers attend over the whole prompt (the paper
            does not apply Quest to the first 2 layers; 0 keeps every layer within the budget).
    """

    page_size: int = 16
    store: str = "device"
    dense_layers: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("page_size", self.page_size, 1)
        check_int("dense_layers", self.dense_layers, 0)
        if self.store not in ("device", "host"):
            raise ValueError(f"store must be 'device' or 'host', got {self.store!r}.")

    def plan(self, spec: ModelSpec, spans: PromptSpans, tokens_per_head: int) -> Plan:
        """Pages of this prompt and how many each head attends per step."""
        pages = spans.prompt_len // self.page_size
        partial = spans.prompt_len - pages * self.page_size
        per_step = min(pages, max(0, tokens_per_head - partial) // self.page_size)
        return Plan(page_size=self.page_size, pages_per_head=pages, pages_per_step=per_step, partial_page_tokens=partial,
                    dense_layers=self.dense_layers, store=self.store)

    def compress(self, ctx: LayerContext, plan: Plan) -> Decision:
        """Keep the trailing partial page in the layer; every full page goes to the pool."""
        kv_heads, length = ctx.keys.shape[:2]
        pages = plan.extra["pages_per_head"]
        keep = torch.ones(kv_heads, length, dtype=torch.bool, device=ctx.keys.device)
        if ctx.layer_idx < self.dense_layers or not pages:
            return Decision(keep)
        paged = pages * self.page_size
        keep[:, :paged] = False
        positions = torch.arange(paged, device=ctx.keys.device).view(pages, self.page_size)
        per_step = plan.extra["pages_per_step"]
        return Decision(keep, [ChunkRequest(h, positions, per_step) for h in range(kv_heads)], store=self.store)
