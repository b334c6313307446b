"""Quest (Tang et al., 2024, "Quest: Query-Aware Sparsity for Efficient Long-Context LLM
Inference")."""

from __future__ import annotations

import torch

from hybridkv.cache import CompressedLayer
from hybridkv.methods.base import LayerContext, Method
from hybridkv.models.architectures import ModelSpec
from hybridkv.retrieval import ChunkRetriever
from hybridkv.spans import PromptSpans


class Quest(Method):
    """Query-aware page retrieval without eviction: the whole prompt KV is kept, cut into pages of
    ``page_size`` consecutive tokens with channel-wise min/max key bounds. Every decoding step,
    each KV head attends over the pages with the highest upper bound of ``q . k``
    (``sum_d max(q_d min_d, q_d max_d)``), as many as fit its budget, plus the prompt's last
    partial page (the ``L mod page_size`` trailing tokens, always attended) and every generated
    token. The pages and their selection are :class:`~hybridkv.retrieval.ChunkRetriever`'s
    (shared with HybridKV's dynamic heads).

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

    def __init__(self, budget: float = 0.1, page_size: int = 16, store: str = "device",
                 dense_layers: int = 0) -> None:
        super().__init__(budget)
        if isinstance(page_size, bool) or not isinstance(page_size, int) or page_size < 1:
            raise ValueError(f"page_size must be an int >= 1 tokens, got {page_size!r}.")
        if store not in ("device", "host"):
            raise ValueError(f"store must be 'device' or 'host', got {store!r}.")
        if isinstance(dense_layers, bool) or not isinstance(dense_layers, int) or dense_layers < 0:
            raise ValueError(f"dense_layers must be an int >= 0, got {dense_layers!r}.")
        self.page_size, self.store, self.dense_layers = page_size, store, dense_layers

    def begin_prompt(self, spec: ModelSpec, spans: PromptSpans, tokens_per_head: int) -> None:
        """Pages of this prompt and how many each head attends per step."""
        self.pages = spans.prompt_len // self.page_size
        self.tail_tokens = spans.prompt_len - self.pages * self.page_size
        self.pages_per_step = min(self.pages, max(0, tokens_per_head - self.tail_tokens) // self.page_size)

    def compress(self, ctx: LayerContext, layer: CompressedLayer) -> None:
        """Keep the trailing partial page in the layer; hand the full pages to a retriever."""
        kv_heads, length, dim = ctx.keys.shape
        paged = self.pages * self.page_size
        keep = torch.ones(kv_heads, length, dtype=torch.bool, device=ctx.keys.device)
        if ctx.layer_idx < self.dense_layers or not self.pages:
            layer.compress(keep)
            return
        keep[:, :paged] = False
        layer.compress(keep)
        keys = ctx.keys[:, :paged].reshape(kv_heads * self.pages, self.page_size, dim)  # (Hkv*P, C, D), head-major
        values = ctx.values[:, :paged].reshape(kv_heads * self.pages, self.page_size, dim)
        heads = torch.arange(kv_heads).repeat_interleave(self.pages)
        starts = torch.arange(0, paged, self.page_size).repeat(kv_heads)
        select = torch.full((kv_heads,), self.pages_per_step)
        layer.retriever = ChunkRetriever(keys, values, heads, starts, select, self.store)

    def report_extra(self) -> dict:
        """Page geometry and the pages each head attends per step."""
        return {"page_size": self.page_size, "pages_per_head": self.pages, "pages_per_step": self.pages_per_step,
                "tail_tokens": self.tail_tokens, "dense_layers": self.dense_layers, "store": self.store}
