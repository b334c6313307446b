"""SparseMM (Wang et al., 2025, "SparseMM: Head Sparsity Emerges from Visual Concept Responses in
MLLMs")."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hybridkv.budget import waterfill
from hybridkv.decisions import LayerContext, Plan
from hybridkv.head_profile import HeadProfile
from hybridkv.methods.base import check_share
from hybridkv.methods.registry import register
from hybridkv.methods.snapkv import SnapKV
from hybridkv.models.architectures import ModelSpec
from hybridkv.spans import PromptSpans


@register
@dataclass(eq=False, kw_only=True)
class SparseMM(SnapKV):
    """SnapKV scores with head budgets that follow visual-head scores: the whole model's budget
    (``tokens_per_head x layers x kv_heads`` slots) is spread over all layers and KV heads at
    once, every head getting a uniform base share plus a share proportional to its score.

    The paper scores heads offline by how often their attention lands on the image patch that
    the generated token describes (OCR calibration data). Here the score is
    :attr:`HeadProfile.importance <hybridkv.head_profile.HeadProfile>` from the project's own
    profiler (:func:`hybridkv.profile.profile_heads`): the attention mass decoding puts on
    visual tokens, per KV head. Every head first keeps the observation window; the rest of the
    budget is split by :func:`hybridkv.budget.waterfill` (no head above the prompt, its excess
    going to the others), so the sum of head budgets never exceeds the model's budget.

    Args:
        budget: fraction in (0, 1] of the prompt, or int tokens per KV head on average.
        window_size / kernel_size: SnapKV's (see :class:`~hybridkv.methods.snapkv.SnapKV`).
        profile: a :class:`~hybridkv.head_profile.HeadProfile` of the model this method is applied
            to (required; another model's profile is refused by :meth:`apply`).
        base_share: share of the free budget (outside the windows) split uniformly across
            heads, in [0, 1]; the rest goes by score. The paper's ``ratio`` (0.1).
    """

    profile: HeadProfile | None = None
    base_share: float = 0.1
    needs_profile = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.profile, HeadProfile):
            raise TypeError(
                f"SparseMM needs profile=HeadProfile (profile_heads(model, samples) or HeadProfile.load(path)), "
                f"got {type(self.profile).__name__}."
            )
        check_share("base_share", self.base_share)
        self.base_share = float(self.base_share)

    def __repr__(self) -> str:
        return (f"SparseMM(budget={self.budget!r}, profile of {self.profile.identity.get('model_type')}, "
                f"base_share={self.base_share}, window_size={self.window_size}, kernel_size={self.kernel_size})")

    def check_model(self, model: torch.nn.Module) -> None:
        """Refuse a profile made for another model."""
        self.profile.check_model(model)

    def plan(self, spec: ModelSpec, spans: PromptSpans, tokens_per_head: int) -> Plan:
        """Per-head budgets (layers, kv_heads) of this prompt from the profile's scores."""
        heads = spec.num_layers * spec.num_kv_heads
        length = spans.prompt_len
        window = self.window(tokens_per_head)
        score = torch.tensor(self.profile.importance, dtype=torch.float64).flatten().clamp_min(0)
        share = score / score.sum() if score.sum() > 0 else torch.full((heads,), 1.0 / heads, dtype=torch.float64)
        weights = self.base_share / heads + (1.0 - self.base_share) * share
        free = waterfill((tokens_per_head - window) * heads, weights, torch.full((heads,), length - window))
        budgets = (window + free).view(spec.num_layers, spec.num_kv_heads)
        return Plan(allocated_budgets=budgets.tolist(), window=window, base_share=self.base_share)

    def head_counts(self, scores: torch.Tensor, ctx: LayerContext, plan: Plan) -> torch.Tensor:
        """(Hkv,) this layer's allocated budgets."""
        return torch.tensor(plan.extra["allocated_budgets"][ctx.layer_idx])
