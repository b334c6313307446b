"""Stage 1 of HybridKV, the profiling run: measure every KV head's staticness and importance on
calibration samples (definitions in :mod:`hybridkv.head_profile`).

Profiling runs the model with a full cache through the engine and computes only the attention
rows it needs (the text-prior queries at the end of each layer's prefill, block by block, and
one query per decoding step), never a full attention matrix.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from hybridkv.cache import CompressedLayer
from hybridkv.decisions import Decision, LayerContext, Plan
from hybridkv.head_profile import HeadProfile, ProfileMismatchError, classify, model_identity, top_prior
from hybridkv.methods.base import Method
from hybridkv.models.architectures import ModelSpec, model_spec
from hybridkv.scoring import mean_attention
from hybridkv.spans import PromptSpans

__all__ = ["HeadProfile", "ProfileMismatchError", "profile_heads"]


@dataclass
class _Statistics:
    """Sums over calibration samples and decoding steps, per layer and KV head."""

    static_sum: torch.Tensor
    mass_sum: torch.Tensor
    steps: torch.Tensor


@dataclass(eq=False, kw_only=True)
class _Profiler(Method):
    """Full-cache run that records text-prior and decode-time attention over context tokens."""

    budget: float = 1.0
    topk_share: float = 0.1
    stats: _Statistics | None = field(default=None, repr=False)

    def plan(self, spec: ModelSpec, spans: PromptSpans, tokens_per_head: int) -> Plan:
        if spans.context.sum() == 0:
            raise ValueError("a calibration sample has no visual/context tokens to profile; give prompts with images.")
        return Plan()

    def compress(self, ctx: LayerContext, plan: Plan) -> Decision:
        context = ctx.spans.context.to(ctx.keys.device)
        prior = mean_attention(ctx.queries, ctx.keys, ctx.spans.query_start, ctx.scaling)[:, context]  # (Hkv, V)
        top = top_prior(prior / prior.sum(-1, keepdim=True), self.topk_share)  # (Hkv, k)
        layer_idx, scaling = ctx.layer_idx, ctx.scaling  # not ctx: it holds the whole prompt's queries

        def observe(query: torch.Tensor, layer: CompressedLayer) -> None:
            self._observe(layer_idx, query, layer, context, top, scaling)

        keep = torch.ones(ctx.keys.shape[:2], dtype=torch.bool, device=ctx.keys.device)
        return Decision(keep, observer=observe)

    def _observe(self, layer_idx: int, query: torch.Tensor, layer: CompressedLayer, context: torch.Tensor,
                 top: torch.Tensor, scaling: float) -> None:
        """Accumulate one decoding step's staticness and context mass (query: (1, Hq, Q, D))."""
        kv_heads, length = layer.kv_heads, context.shape[0]
        group = query.shape[1] // kv_heads
        keys = layer.keys[0, :, : layer.stored].float()  # everything kept: the prompt, then the rest
        qg = query[0, :, -1].reshape(kv_heads, group, -1).float()  # (Hkv, G, D)
        logits = qg @ keys.transpose(1, 2) + layer.bias[0, :, :, : layer.stored].float()
        probs = torch.softmax(logits * scaling, dim=-1)[..., :length][..., context].mean(dim=1)  # (Hkv, V)
        mass = probs.sum(-1)
        captured = probs.gather(1, top).sum(-1) / mass.clamp_min(1e-12)
        self.stats.static_sum[layer_idx] += captured.double().cpu()
        self.stats.mass_sum[layer_idx] += mass.double().cpu()
        self.stats.steps[layer_idx] += 1


def profile_heads(
    model: torch.nn.Module,
    samples: list[dict],
    decode_tokens: int = 8,
    topk_share: float = 0.1,
    threshold: float = 0.5,
    max_dynamic_share: float = 0.5,
    query_tokens: int | None = None,
    progress: bool = False,
) -> HeadProfile:
    """Profile a model's KV heads on calibration samples (stage 1).

    Args:
        model: a supported model.
        samples: processor outputs (dicts of tensors with ``input_ids``, batch 1) with
            visual tokens (or, for text models, a context before the question); a sample may
            carry an int ``"query_tokens"`` entry (its question length) for text models.
        decode_tokens: greedy tokens decoded per sample with the full cache (the steps ``t``).
        topk_share: share of context tokens in ``TopK(a_text)``.
        threshold: staticness below which a head is dynamic.
        max_dynamic_share: cap on the share of dynamic heads.
        query_tokens: text models only: trailing question tokens of samples without their own.
        progress: show a progress bar over samples.
    Returns:
        The :class:`HeadProfile` (staticness and importance averaged over samples and steps).
    """
    if not samples:
        raise ValueError("profile_heads needs at least one calibration sample.")
    if decode_tokens < 2:
        raise ValueError("profile_heads needs decode_tokens >= 2 (the first token comes from the prefill).")
    spec = model_spec(model)
    zeros = torch.zeros(spec.num_layers, spec.num_kv_heads, dtype=torch.float64)
    stats = _Statistics(zeros, zeros.clone(), torch.zeros(spec.num_layers))
    profiler = _Profiler(topk_share=topk_share, stats=stats)
    iterator = samples
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(samples, desc="profiling heads", unit="sample")
    with torch.inference_mode():
        for sample in iterator:
            sample = dict(sample)
            with profiler.apply(model, query_tokens=sample.pop("query_tokens", query_tokens)):
                model.generate(**sample, max_new_tokens=decode_tokens, do_sample=False)
    steps = stats.steps.clamp_min(1)[:, None].double()
    staticness = (stats.static_sum / steps).float()
    importance = (stats.mass_sum / steps).float()
    return HeadProfile(
        identity=model_identity(model),
        staticness=staticness.tolist(),
        importance=importance.tolist(),
        head_types=classify(staticness, threshold, max_dynamic_share),
        params={"topk_share": topk_share, "threshold": threshold, "max_dynamic_share": max_dynamic_share,
                "decode_tokens": decode_tokens, "samples": len(samples), "source": "offline"},
    )
