"""Prefill once, decode under many methods: the evaluation harness's shared path.

Every hybridkv method computes the prefill with full attention and compresses each layer at
its end, so the prefill's logits and every layer's (queries, keys, values) are the same for
all methods. :func:`capture_prefill` records them once per prompt; :func:`decode` builds each
method's compressed cache from the capture (``Engine.cache_from_prefill``) and decodes in a
plain loop. ``tests/test_harness.py`` proves this gives the tokens of
``with method.apply(model): model.generate(...)`` for every method.

A prompt can also end with a *tail* that is fed after compression (``tail_tokens``): the
prefix is prefilled and compressed, then the tail goes through the compressed cache in one
forward (causal among its tokens, not compressed) and its last logits choose the first answer
token. Without a tail the first answer token comes from the full-attention prefill, which is
the same for every method, so a one-word answer could not show what compression lost.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from hybridkv.decisions import Decision, LayerContext, Plan
from hybridkv.methods.base import Method
from hybridkv.models.architectures import model_spec

_PER_POSITION = ("input_ids", "attention_mask", "token_type_ids", "mm_token_type_ids")
"""Input keys indexed by prompt position, cut when a tail is split off."""


@dataclass
class PrefillCapture:
    """One prompt's full prefill.

    Attributes:
        input_ids: (1, L) prompt ids. query_tokens: the question span given to methods.
        layers: per layer (queries (Hq, L, D), keys (Hkv, L, D), values (Hkv, L, D)), after RoPE.
        scaling: attention softmax scale. last_logits: (vocab,) float32 logits of the last prompt position.
        rope_deltas: Qwen-VL's M-RoPE offset the prefill left on the model (None for text
            models); :func:`decode` puts it back, since another prompt's prefill overwrites it.
        tail: (T,) prompt ids fed after compression, or None (then ``input_ids`` is the whole prompt).
        rotation: ((L, D), (L, D)) the prompt keys' RoPE ``cos``/``sin``
            (:attr:`hybridkv.decisions.LayerContext.rotation`), or None.
        memo: scores that depend on this prefill alone, kept by the methods that compress it
            (:attr:`hybridkv.decisions.LayerContext.memo`), so e.g. H2O's whole-matrix column sums
            are computed once for every budget.
    """

    input_ids: torch.Tensor
    query_tokens: int | None
    layers: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    scaling: float
    last_logits: torch.Tensor
    rope_deltas: torch.Tensor | None = None
    tail: torch.Tensor | None = None
    rotation: tuple[torch.Tensor, torch.Tensor] | None = None
    memo: dict = field(default_factory=dict, repr=False)


@dataclass(eq=False, kw_only=True)
class _Capture(Method):
    """Keeps everything and records each layer's prefill tensors (one sequence)."""

    budget: float = 1.0
    layers: list = field(default_factory=list, repr=False)
    scaling: list = field(default_factory=list, repr=False)
    rotation: tuple | None = field(default=None, repr=False)

    def compress(self, ctx: LayerContext, plan: Plan) -> Decision:
        self.layers.append((ctx.queries, ctx.keys, ctx.values))
        self.scaling.append(ctx.scaling)
        self.rotation = ctx.rotation
        return Decision(torch.ones(ctx.keys.shape[:2], dtype=torch.bool, device=ctx.keys.device))


def capture_prefill(model: torch.nn.Module, inputs: dict, query_tokens: int | None = None,
                    tail_tokens: int = 0) -> PrefillCapture:
    """Prefill ``inputs`` (batch 1) with the full cache and record what every method needs.

    Args:
        query_tokens: trailing tokens of the compressed prefix that form the question (None: inferred).
        tail_tokens: trailing prompt tokens to feed after compression instead of prefilling them;
            they must not hold visual tokens.
    """
    prefix, tail = split_tail(model, inputs, tail_tokens)
    capture = _Capture()
    with torch.inference_mode(), capture.apply(model, query_tokens=query_tokens):
        out = model(**prefix, past_key_values=DynamicCache(), use_cache=True)
    return PrefillCapture(prefix["input_ids"], query_tokens, capture.layers, capture.scaling[0],
                          out.logits[0, -1].float(), getattr(model.model, "rope_deltas", None), tail, capture.rotation)


def split_tail(model: torch.nn.Module, inputs: dict, tail_tokens: int) -> tuple[dict, torch.Tensor | None]:
    """``inputs`` without its last ``tail_tokens`` positions, and those (T,) ids (None when 0)."""
    if tail_tokens == 0:
        return inputs, None
    ids = inputs["input_ids"]
    if ids.shape[0] != 1 or not 0 < tail_tokens < ids.shape[1]:
        raise ValueError(f"tail_tokens={tail_tokens} must be between 1 and the prompt length minus one "
                         f"({ids.shape[1] - 1}) of a batch-1 prompt.")
    tail = ids[0, -tail_tokens:]
    visual = model_spec(model).visual_token_ids
    if visual and bool(torch.isin(tail, torch.tensor(visual, device=tail.device)).any()):
        raise ValueError("the tail fed after compression holds visual tokens: images must be in the compressed prefix.")
    prefix = {k: (v[:, :-tail_tokens] if k in _PER_POSITION else v) for k, v in inputs.items()}
    return prefix, tail


@dataclass
class Decoded:
    """Greedy (or teacher-forced) decoding under one method.

    Attributes:
        tokens: (T,) generated (or forced) ids. logits: (T, vocab) float32 logits that chose them.
        report: the method's :class:`~hybridkv.report.CacheReport`.
    """

    tokens: torch.Tensor
    logits: torch.Tensor
    report: object


def decode(model: torch.nn.Module, method: Method, capture: PrefillCapture, max_new_tokens: int,
           forced: torch.Tensor | None = None, stop_ids: tuple[int, ...] = ()) -> Decoded:
    """Decode from a captured prefill under ``method``.

    Args:
        max_new_tokens: tokens to produce (the first comes from the shared prefill logits, or
            from the tail's forward through the compressed cache when the capture has a tail).
        forced: (T,) ids to feed instead of the argmax (teacher forcing, for KL); T bounds the steps.
        stop_ids: greedy decoding stops after emitting one of these.
    """
    steps = max_new_tokens if forced is None else forced.shape[0]
    tokens = []
    if capture.rope_deltas is not None:
        model.model.rope_deltas = capture.rope_deltas
    with torch.inference_mode(), method.apply(model, query_tokens=capture.query_tokens) as engine:
        cache = engine.cache_from_prefill(capture)
        if capture.tail is None:
            logits = [capture.last_logits]
        else:
            out = model(input_ids=capture.tail[None], past_key_values=cache, use_cache=True)
            logits = [out.logits[0, -1].float()]
        for step in range(steps):
            token = int(forced[step]) if forced is not None else int(logits[-1].argmax())
            tokens.append(token)
            if step == steps - 1 or (forced is None and token in stop_ids):
                break
            out = model(input_ids=torch.tensor([[token]], device=model.device), past_key_values=cache, use_cache=True)
            logits.append(out.logits[0, -1].float())
    return Decoded(torch.tensor(tokens), torch.stack(logits[: len(tokens)]).cpu(), method.report)


def prefix_agreement(tokens: torch.Tensor, reference: torch.Tensor) -> float:
    """Share of the reference's tokens reproduced before the first difference (1.0 = identical)."""
    n = min(tokens.shape[0], reference.shape[0])
    differ = (tokens[:n] != reference[:n]).nonzero()
    same = int(differ[0]) if differ.numel() else n
    return same / max(1, reference.shape[0])


def mean_kl(reference_logits: torch.Tensor, logits: torch.Tensor) -> float:
    """Mean over steps of KL(reference || method) of the next-token distributions (nats)."""
    ref = F.log_softmax(reference_logits, dim=-1)
    mine = F.log_softmax(logits, dim=-1)
    return float((ref.exp() * (ref - mine)).sum(-1).mean())
