"""What a method did to the cache of one prompt (a batch of sequences, or one sequence)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass(frozen=True)
class CacheReport:
    """Memory and selection figures of one prompt's cache (the last generate() or forward loop).

    For a batch, the top-level figures are totals over the sequences (``attended_tokens_per_step``
    is the mean, ``head_budgets`` the sum) and ``sequences`` holds one report per sequence; for
    one sequence ``sequences`` is empty.

    Attributes:
        method: method class name. budget: the budget it was given (fraction or tokens/head).
        batch_size: sequences in the cache.
        prompt_tokens: tokens prefilled (padding excluded). visual_tokens: image/video
            placeholder tokens among them.
        context_tokens: tokens of the span playing the visual role (visual tokens, or the
            text context before the query span of a text prompt).
        query_tokens / query_source: the text-prior query span and how it was found.
        generated_tokens: tokens fed to the model after the prompt (per sequence).
        full_kv_bytes: bytes a plain ``DynamicCache`` holds for the same run (padding included,
            as transformers holds it).
        resident_kv_bytes: bytes of KV storage (and its index tensors) the cache holds on the
            model's devices, counted from the tensors' storages (unused columns included).
        offloaded_kv_bytes: bytes held in host memory for retrieval (0 for eviction methods).
        attended_tokens_per_step: mean over the steps after compression, layers, sequences and
            KV heads of the entries a head attends.
        layer_budgets: prompt tokens held per layer (summed over KV heads, all tiers).
        head_budgets: prompt tokens held per layer and KV head: kept entries plus any
            retrieval pool (what a head attends per step is method-specific, see ``extra``).
        head_types: per layer and KV head, ``"static"``/``"dynamic"`` (HybridKV) or None.
        profile_source: ``"offline"``/``"online"`` for HybridKV, None otherwise.
        compressions: compression events (the prompt, then every later turn compressed).
        budget_exceeded_tokens: tokens (summed over layers and KV heads) kept beyond the budget
            because the method had to keep them (0 when the budget held everything).
        extra: method-specific figures (of the prompt; ``extra["later_turns"]`` lists those of
            later compressed turns).
        sequences: per-sequence reports of a batch.
    """

    method: str
    budget: float | int
    batch_size: int
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
    compressions: int = 1
    budget_exceeded_tokens: int = 0
    extra: dict = field(default_factory=dict)
    sequences: list[CacheReport] = field(default_factory=list)

    @property
    def compression_ratio(self) -> float:
        """Full-cache bytes over the bytes held in all tiers."""
        return self.full_kv_bytes / max(1, self.resident_kv_bytes + self.offloaded_kv_bytes)

    def to_dict(self) -> dict:
        """Plain-JSON dict of every field plus ``compression_ratio``."""
        out = asdict(self)
        out["compression_ratio"] = self.compression_ratio
        out["sequences"] = [s.to_dict() for s in self.sequences]
        return out
