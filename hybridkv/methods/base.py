"""The interface every KV method implements, and budget arithmetic."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hybridkv.cache import CompressedLayer
from hybridkv.models.architectures import ModelSpec
from hybridkv.report import CacheReport
from hybridkv.spans import PromptSpans


def validate_budget(budget: float) -> float | int:
    """Check a budget: a float fraction in (0, 1] of the prompt, or an int >= 1 tokens per KV head."""
    if isinstance(budget, bool) or not isinstance(budget, (int, float)):
        raise TypeError(f"budget must be a float in (0, 1] or an int number of tokens per KV head, got {budget!r}.")
    if isinstance(budget, float) and not 0.0 < budget <= 1.0:
        raise ValueError(
            f"budget={budget} is outside (0, 1]: give a fraction of the prompt such as 0.1, "
            "or an int number of tokens per KV head."
        )
    if isinstance(budget, int) and budget < 1:
        raise ValueError(f"budget={budget} tokens per KV head must be >= 1 (or use a float fraction in (0, 1]).")
    return budget


def tokens_per_head(budget: float, prompt_len: int) -> int:
    """Average kept prompt tokens per KV head for ``budget`` on a prompt of ``prompt_len`` tokens."""
    if isinstance(budget, float):
        return max(1, min(prompt_len, round(budget * prompt_len)))
    if budget > prompt_len:
        raise ValueError(
            f"budget={budget} tokens per KV head exceeds the prompt ({prompt_len} tokens): "
            "use a smaller int budget or a fraction such as 0.1."
        )
    return budget


@dataclass
class LayerContext:
    """Everything a method may use to compress one layer at the end of prefill.

    Attributes:
        layer_idx / spec: which layer, and the model's geometry.
        queries: (Hq, L, D) prompt queries after RoPE.
        keys / values: (Hkv, L, D) prompt keys (after RoPE) and values.
        scaling: the attention softmax scale.
        spans: visual/context tokens and the text-prior query span.
        tokens_per_head: the average kept prompt tokens per KV head the budget allows.
    """

    layer_idx: int
    spec: ModelSpec
    queries: torch.Tensor
    keys: torch.Tensor
    values: torch.Tensor
    scaling: float
    spans: PromptSpans
    tokens_per_head: int


class Method:
    """Base class of KV methods: a budget, ``apply(model)`` and the last run's ``report``.

    Subclasses implement :meth:`select` (which prompt tokens each KV head keeps) or override
    :meth:`compress` to attach per-step retrieval to a layer.

    Args:
        budget: fraction of the prompt's KV entries to keep, in (0, 1], or an int number of
            prompt tokens per KV head on average.
    """

    def __init__(self, budget: float = 1.0) -> None:
        self.budget = validate_budget(budget)
        self._engine = None

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({params})"

    def apply(self, model: torch.nn.Module, query_tokens: int | None = None):
        """Context manager that makes ``model`` (unchanged otherwise) use this method's cache.

        Args:
            model: a supported transformers model (see ``hybridkv.models.SUPPORTED_MODEL_TYPES``).
            query_tokens: for text prompts, the number of trailing prompt tokens that form the
                question (the text-prior queries); inferred when None.
        """
        from hybridkv.engine import Engine

        return Engine(model, self, query_tokens)

    @property
    def report(self) -> CacheReport | None:
        """The :class:`CacheReport` of the last prompt run under ``apply`` (None before any)."""
        return self._engine.report() if self._engine is not None else None

    def begin_prompt(self, spec: ModelSpec, spans: PromptSpans, tokens_per_head: int) -> None:
        """Called once per prompt before any layer is compressed (global allocation hook)."""

    def select(self, ctx: LayerContext) -> torch.Tensor:
        """Which prompt tokens each KV head keeps: (Hkv, L) bool."""
        raise NotImplementedError

    def compress(self, ctx: LayerContext, layer: CompressedLayer) -> None:
        """Compress one layer at the end of prefill (default: evict what :meth:`select` drops)."""
        layer.compress(self.select(ctx))

    def report_extra(self) -> dict:
        """Method-specific report fields (head types, profile source, ...)."""
        return {}
