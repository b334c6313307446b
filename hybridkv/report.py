"""What a method did to the cache during the last generate()."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class CacheReport:
    """Memory and selection figures of one prompt's cache (the last generate() or forward loop).

    Attributes:
        method: method class name. budget: the budget it was given (fraction or tokens/head).
        prompt_tokens: tokens prefilled. visual_tokens: image/video placeholder tokens among them.
        context_tokens: tokens of the span playing the visual role (visual tokens, or the
            text context before the query span of a text prompt).
        query_tokens / query_source: the text-prior query span and how it was found.
        generated_tokens: tokens fed to the model after the prompt.
        full_kv_bytes: bytes a plain ``DynamicCache`` holds for the same run.
        resident_kv_bytes: bytes of KV storage (and its index tensors) the cache holds on the
            model's device, counted from the tensors' storages (preallocated slack included).
        offloaded_kv_bytes: bytes held in host memory for retrieval (0 for eviction methods).
        attended_tokens_per_step: mean over decoding steps, layers and KV heads of the tokens
            a head attends over.
        layer_budgets: prompt tokens held per layer (summed over KV heads, all tiers).
        head_budgets: prompt tokens held per layer and KV head: kept entries plus any
            retrieval pool (what a head attends per step is method-specific, see ``extra``).
        head_types: per layer and KV head, ``"static"``/``"dynamic"`` (HybridKV) or None.
        profile_source: ``"offline"``/``"online"`` for HybridKV, None otherwise.
        extra: method-specific figures.
    """

    method: str
    budget: float | int
    prompt_tokens: int
    visual_tokens: int
    context_tokens: int
    query_tokens: int
    query_source: str
    generated_tokens: int
    full_kv_bytes: int
    resident_kv_bytes: int
    offloaded_kv_bytes: int
    attended_tokens_per_step: float
    layer_budgets: list[int]
    head_budgets: list[list[int]]
    head_types: list[list[str]] | None = None
    profile_source: str | None = None
    extra: dict = field(default_factory=dict)

    @property
    def compression_ratio(self) -> float:
        """Full-cache bytes over the bytes held in all tiers."""
        return self.full_kv_bytes / max(1, self.resident_kv_bytes + self.offloaded_kv_bytes)

    def to_dict(self) -> dict:
        """Plain-JSON dict of every field plus ``compression_ratio``."""
        out = asdict(self)
        out["compression_ratio"] = self.compression_ratio
        return out
