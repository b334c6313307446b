"""Stage 1 of HybridKV: classify every KV head as static or dynamic from text-centric attention.

For a KV head (query heads of a GQA group averaged) and a prompt with context (visual) tokens V:

* ``a_text`` (V,): the text-prior queries' attention over the context tokens, averaged over
  those queries and renormalised over V;
* ``a_t`` (V,): the attention over the context tokens of decoding step ``t``, renormalised;
* **staticness** ``s = mean_t sum_{i in TopK(a_text, k)} a_t[i]``, ``k = ceil(topk_share * V)``:
  the share of what decoding reads that the text prior already points at;
* **importance**: the raw attention mass decoding puts on context tokens (mean over steps).

A head is dynamic when ``s < threshold``; at most ``max_dynamic_share`` of all heads are
dynamic (the least static ones). Profiling runs the model with a full cache through the engine
and computes only the rows it needs (the text-prior queries at the end of each layer's
prefill, one query per decoding step), never a full attention matrix.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from hybridkv.cache import CompressedLayer
from hybridkv.methods.base import LayerContext, Method
from hybridkv.models.architectures import ModelSpec, model_spec
from hybridkv.scoring import query_attention
from hybridkv.spans import PromptSpans

PROFILE_FORMAT = "hybridkv.head_profile/1"
_IDENTITY_SKIP = {"_name_or_path", "transformers_version", "architectures", "dtype", "torch_dtype", "_attn_implementation",
                  "_attn_implementation_internal", "use_cache", "output_attentions", "output_hidden_states", "return_dict"}


class ProfileMismatchError(ValueError):
    """A head profile was made for another model (or is not a profile file)."""


def model_identity(model: torch.nn.Module) -> dict:
    """Architecture, geometry and a hash of the text config's architecture fields."""
    spec = model_spec(model)
    text = model.config.get_text_config(decoder=True).to_dict()
    arch = {k: v for k, v in sorted(text.items()) if k not in _IDENTITY_SKIP and not k.startswith("_")}
    digest = hashlib.sha256(json.dumps(arch, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return {"model_type": spec.model_type, "num_layers": spec.num_layers, "num_kv_heads": spec.num_kv_heads,
            "head_dim": spec.head_dim, "config_hash": digest}


def classify(staticness: torch.Tensor, threshold: float, max_dynamic_share: float) -> list[list[str]]:
    """Head types from staticness (layers, kv_heads): dynamic below ``threshold``, capped to the
    ``max_dynamic_share`` least static heads."""
    flat = staticness.flatten()
    cap = int(max_dynamic_share * flat.numel())
    order = flat.argsort()  # least static first
    dynamic = torch.zeros_like(flat, dtype=torch.bool)
    dynamic[order[:cap]] = flat[order[:cap]] < threshold
    types = ["dynamic" if d else "static" for d in dynamic.tolist()]
    width = staticness.shape[1]
    return [types[i : i + width] for i in range(0, len(types), width)]


def top_prior(a_text: torch.Tensor, topk_share: float) -> torch.Tensor:
    """(H, k) indices of each head's ``ceil(topk_share * V)`` highest text-prior context tokens."""
    k = max(1, math.ceil(topk_share * a_text.shape[-1]))
    return a_text.topk(min(k, a_text.shape[-1]), dim=-1).indices


def text_prior(ctx: LayerContext) -> torch.Tensor:
    """(Hkv, L) text-prior attention: the text-prior queries' attention over the prompt, mean
    over those queries and the query heads of each group."""
    return query_attention(ctx.queries, ctx.keys, ctx.spans.query_start, ctx.scaling).mean(dim=(1, 2))


@dataclass
class HeadProfile:
    """Per layer and KV head: staticness, importance and type, plus the model identity.

    Attributes:
        identity: :func:`model_identity` of the profiled model.
        staticness / importance: (layers, kv_heads) nested lists of floats.
        head_types: (layers, kv_heads) ``"static"`` / ``"dynamic"``.
        params: the classification parameters (threshold, topk_share, max_dynamic_share,
            decode_tokens) and the number of samples.
    """

    identity: dict
    staticness: list[list[float]]
    importance: list[list[float]]
    head_types: list[list[str]]
    params: dict = field(default_factory=dict)

    @property
    def dynamic_share(self) -> float:
        """Share of KV heads classified dynamic."""
        flat = [t for row in self.head_types for t in row]
        return flat.count("dynamic") / len(flat)

    def check_model(self, model: torch.nn.Module) -> None:
        """Raise :class:`ProfileMismatchError` unless this profile was made for ``model``'s architecture."""
        mine = model_identity(model)
        if mine != self.identity:
            raise ProfileMismatchError(
                f"this head profile was made for {self.identity}, not for this model ({mine}); "
                "run `hybridkv profile --model ...` (or profile_heads) on this model."
            )

    def save(self, path: str | Path) -> None:
        """Write the profile as JSON."""
        data = {"format": PROFILE_FORMAT, "identity": self.identity, "staticness": self.staticness,
                "importance": self.importance, "head_types": self.head_types, "params": self.params}
        Path(path).write_text(json.dumps(data, indent=1))

    @classmethod
    def load(cls, path: str | Path) -> HeadProfile:
        """Read a profile written by :meth:`save`; a malformed file is a clear error."""
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise ProfileMismatchError(f"cannot read head profile {path}: {error}") from error
        if not isinstance(data, dict) or data.get("format") != PROFILE_FORMAT:
            raise ProfileMismatchError(f"{path} is not a hybridkv head profile (expected format {PROFILE_FORMAT!r}).")
        try:
            profile = cls(data["identity"], data["staticness"], data["importance"], data["head_types"], data["params"])
            layers, heads = profile.identity["num_layers"], profile.identity["num_kv_heads"]
            shapes = {(len(m), *{len(r) for r in m}) for m in (profile.staticness, profile.importance, profile.head_types)}
        except (KeyError, TypeError) as error:
            raise ProfileMismatchError(f"{path} is a malformed head profile: missing or bad {error}.") from error
        if shapes != {(layers, heads)} or not {t for r in profile.head_types for t in r} <= {"static", "dynamic"}:
            raise ProfileMismatchError(f"{path} is a malformed head profile: tables are not {layers} x {heads} of known types.")
        return profile


class _Profiler(Method):
    """Full-cache method that records text-prior and decode-time attention over context tokens."""

    def __init__(self, spec: ModelSpec, topk_share: float) -> None:
        super().__init__(1.0)
        self.topk_share = topk_share
        self.static_sum = torch.zeros(spec.num_layers, spec.num_kv_heads, dtype=torch.float64)
        self.mass_sum = torch.zeros_like(self.static_sum)
        self.steps = torch.zeros(spec.num_layers)

    def begin_prompt(self, spec: ModelSpec, spans: PromptSpans, tokens_per_head: int) -> None:
        if spans.context.sum() == 0:
            raise ValueError("a calibration sample has no visual/context tokens to profile; give prompts with images.")

    def compress(self, ctx: LayerContext, layer: CompressedLayer) -> None:
        context = ctx.spans.context.to(ctx.keys.device)
        prior = text_prior(ctx)[:, context]  # (Hkv, V)
        top = top_prior(prior / prior.sum(-1, keepdim=True), self.topk_share)  # (Hkv, k)
        layer.compress(torch.ones(ctx.keys.shape[:2], dtype=torch.bool, device=ctx.keys.device))
        layer_idx, scaling = ctx.layer_idx, ctx.scaling  # not ctx: it holds the whole prompt's queries
        layer.observer = lambda q, lay: self._observe(layer_idx, q, lay, context, top, scaling)

    def _observe(self, layer_idx: int, q: torch.Tensor, layer: CompressedLayer, context: torch.Tensor,
                 top: torch.Tensor, scaling: float) -> None:
        """Accumulate one decoding step's staticness and context mass (q: (Hq, 1, D))."""
        kv_heads, length = layer.kv_heads, context.shape[0]
        group = q.shape[0] // kv_heads
        prompt_k = layer.prefix_keys.view(kv_heads, length, -1)  # everything kept: (Hkv, L, D)
        recent_k, _ = layer.recent()
        qg = q[:, -1].reshape(kv_heads, group, -1).float()  # (Hkv, G, D)
        logits = torch.cat([qg @ prompt_k.float().transpose(1, 2), qg @ recent_k[0].float().transpose(1, 2)], dim=-1)
        probs = torch.softmax(logits * scaling, dim=-1)[..., :length][..., context].mean(dim=1)  # (Hkv, V)
        mass = probs.sum(-1)
        captured = probs.gather(1, top).sum(-1) / mass.clamp_min(1e-12)
        self.static_sum[layer_idx] += captured.double().cpu()
        self.mass_sum[layer_idx] += mass.double().cpu()
        self.steps[layer_idx] += 1


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
    profiler = _Profiler(spec, topk_share)
    iterator = samples
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(samples, desc="profiling heads", unit="sample")
    with torch.inference_mode():
        for sample in iterator:
            sample = dict(sample)
            with profiler.apply(model, query_tokens=sample.pop("query_tokens", query_tokens)):
                model.generate(**sample, max_new_tokens=decode_tokens, do_sample=False)
    steps = profiler.steps.clamp_min(1)[:, None].double()
    staticness = (profiler.static_sum / steps).float()
    importance = (profiler.mass_sum / steps).float()
    return HeadProfile(
        identity=model_identity(model),
        staticness=staticness.tolist(),
        importance=importance.tolist(),
        head_types=classify(staticness, threshold, max_dynamic_share),
        params={"topk_share": topk_share, "threshold": threshold, "max_dynamic_share": max_dynamic_share,
                "decode_tokens": decode_tokens, "samples": len(samples), "source": "offline"},
    )
