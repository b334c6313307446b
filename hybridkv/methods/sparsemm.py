"""SparseMM (Wang et al., 2025, "SparseMM: Head Sparsity Emerges from Visual Concept Responses in
MLLMs")."""

from __future__ import annotations

import torch

from hybridkv.budget import waterfill
from hybridkv.methods.base import LayerContext, Method
from hybridkv.models.architectures import ModelSpec
from hybridkv.profile import HeadProfile
from hybridkv.scoring import snap_scores, top_mask
from hybridkv.spans import PromptSpans


class SparseMM(Method):
    """Head budgets follow visual-head scores: the whole model's budget
    (``tokens_per_head x layers x kv_heads`` slots) is spread over all layers and KV heads at
    once, every head getting a uniform base share plus a share proportional to its score; SnapKV
    scores (observation-window attention, pooled; see :class:`~hybridkv.methods.snapkv.SnapKV`)
    choose the tokens inside each head.

    The paper scores heads offline by how often their attention lands on the image patch that
    the generated token describes (OCR calibration data). Here the score is
    :attr:`HeadProfile.importance <hybridkv.profile.HeadProfile>` from the project's own
    profiler (:func:`hybridkv.profile.profile_heads`): the attention mass decoding puts on
    visual tokens, per KV head. Every head first keeps the observation window; the rest of the
    budget is split by :func:`hybridkv.budget.waterfill` (no head above the prompt, its excess
    going to the others), so the sum of head budgets never exceeds the model's budget.

    Args:
        budget: fraction in (0, 1] of the prompt, or int tokens per KV head on average.
        profile: a :class:`~hybridkv.profile.HeadProfile` of the model this method is applied
            to (another model's profile is refused by :meth:`apply`).
        base_share: share of the free budget (outside the windows) split uniformly across
            heads, in [0, 1]; the rest goes by score. The paper's ``ratio`` (0.1).
        window_size: observation window every head keeps (counts against the budget; capped
            at the budget). kvpress uses 64.
        kernel_size: SnapKV pooling width (odd). kvpress uses 5.
    """

    def __init__(
        self, budget: float, profile: HeadProfile, base_share: float = 0.1, window_size: int = 64,
        kernel_size: int = 5,
    ) -> None:
        super().__init__(budget)
        if not isinstance(profile, HeadProfile):
            raise TypeError(
                f"profile must be a HeadProfile (profile_heads(model, samples) or HeadProfile.load(path)), "
                f"got {type(profile).__name__}."
            )
        if isinstance(base_share, bool) or not isinstance(base_share, (int, float)) or not 0.0 <= base_share <= 1.0:
            raise ValueError(f"base_share must be in [0, 1], got {base_share!r}.")
        if window_size < 1 or kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"window_size must be >= 1 and kernel_size odd >= 1, got {window_size}, {kernel_size}.")
        self.profile, self.base_share = profile, float(base_share)
        self.window_size, self.kernel_size = window_size, kernel_size

    def __repr__(self) -> str:
        return (f"SparseMM(budget={self.budget!r}, profile of {self.profile.identity.get('model_type')}, "
                f"base_share={self.base_share}, window_size={self.window_size}, kernel_size={self.kernel_size})")

    def apply(self, model: torch.nn.Module, query_tokens: int | None = None):
        """See :meth:`Method.apply`; also refuses a profile made for another model."""
        self.profile.check_model(model)
        return super().apply(model, query_tokens)

    def begin_prompt(self, spec: ModelSpec, spans: PromptSpans, tokens_per_head: int) -> None:
        """Per-head budgets (layers, kv_heads) of this prompt from the profile's scores."""
        heads = spec.num_layers * spec.num_kv_heads
        length = spans.prompt_len
        self.window = min(self.window_size, tokens_per_head)
        score = torch.tensor(self.profile.importance, dtype=torch.float64).flatten().clamp_min(0)
        share = score / score.sum() if score.sum() > 0 else torch.full((heads,), 1.0 / heads, dtype=torch.float64)
        weights = self.base_share / heads + (1.0 - self.base_share) * share
        free = waterfill((tokens_per_head - self.window) * heads, weights, torch.full((heads,), length - self.window))
        self.head_budgets = (self.window + free).view(spec.num_layers, spec.num_kv_heads)

    def select(self, ctx: LayerContext) -> torch.Tensor:
        """(Hkv, L) mask: each head's window plus its best SnapKV scores, its own budget in all."""
        scores = snap_scores(ctx.queries, ctx.keys, self.window, self.kernel_size, ctx.scaling)
        budgets = self.head_budgets[ctx.layer_idx].tolist()
        return torch.cat([top_mask(scores[h : h + 1], n) for h, n in enumerate(budgets)])

    def report_extra(self) -> dict:
        """Allocated budget per layer and KV head, the window and the base share."""
        return {"allocated_budgets": self.head_budgets.tolist(), "window": self.window, "base_share": self.base_share}
