"""What a method decides, as the engine asks and holds it: per prompt a :class:`Plan`, per layer
of one sequence a :class:`Decision` made from a :class:`LayerContext`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from hybridkv.models.architectures import ModelSpec
from hybridkv.spans import PromptSpans


@dataclass
class LayerContext:
    """Everything a method may use to compress one layer of one sequence.

    The *segment* is what is compressed: the whole prompt at the end of its prefill, or the
    tokens seen since the last compression at the end of a later turn's forward. Padding is
    removed: every tensor holds only the sequence's real tokens.

    Attributes:
        layer_idx / spec: which layer, and the model's geometry.
        queries: (Hq, Q, D) queries (after RoPE) of the forward's tokens, which are the last Q
            tokens of the segment.
        keys / values: (Hkv, S, D) the segment's keys (after RoPE) and values.
        scaling: the attention softmax scale.
        spans: visual/context tokens and the text-prior query span of the segment.
        tokens_per_head: the average kept tokens per KV head the budget allows for the segment.
        memo: when the segment is a captured prefill that several methods compress
            (:meth:`hybridkv.engine.Engine.cache_from_prefill`), a dict shared by all of them where a
            method may keep scores that depend on the prefill alone (not on its budget or options);
            None otherwise.
        rotation: ((S, D), (S, D)) the RoPE ``cos``/``sin`` each segment key was rotated by
            (:mod:`hybridkv.rope`), when the segment is the forward's own tokens (a prompt) and
            the model uses ``rotate_half`` RoPE; None otherwise (e.g. a later turn, whose
            segment also holds decoded tokens).
    """

    layer_idx: int
    spec: ModelSpec
    queries: torch.Tensor
    keys: torch.Tensor
    values: torch.Tensor
    scaling: float
    spans: PromptSpans
    tokens_per_head: int
    memo: dict | None = None
    rotation: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def prior_row(self) -> int:
        """Row of ``queries`` where the text-prior query span (``spans.query_start``) begins
        (0 when the queries hold only that span or part of it)."""
        return max(0, self.spans.query_start - (self.keys.shape[1] - self.queries.shape[1]))


@dataclass
class ChunkRequest:
    """A retrieving head's chunk pool, as a method decides it for one sequence.

    Attributes:
        head: the KV head. positions: (M, C) long segment positions of the chunks' tokens.
        select: chunks the head attends per decoding step.
    """

    head: int
    positions: torch.Tensor
    select: int


@dataclass
class Decision:
    """What one layer of one sequence keeps.

    Attributes:
        keep: (Hkv, S) bool segment tokens kept in the layer (attended at every step).
        chunks: retrieval pools of the heads that retrieve (tokens in a pool need not be kept).
        store: where the pools' chunks live, ``"device"`` or ``"host"``.
        observer: optional callable ``observer(query, layer)`` run before every later
            attention of the layer (the head profiler reads decode-time attention through it).
    """

    keep: torch.Tensor
    chunks: list[ChunkRequest] = field(default_factory=list)
    store: str = "device"
    observer: Callable | None = None


class Plan:
    """A method's decisions for one prompt (one sequence, one segment), held by the engine.

    Methods that decide something for the whole prompt before its layers are compressed (layer
    budgets, protected tokens, head types) subclass it; the report reads :meth:`report_extra`.

    Attributes:
        extra: method-specific report fields (keyword arguments of the constructor).
        exceeded: per layer, tokens (summed over KV heads) kept beyond the budget because the
            method had to keep them (protected tokens of a prompt too short for its budget).
        surveys: True when the method decides a layer from statistics of every layer: the
            engine then shows it every layer (:meth:`~hybridkv.methods.base.Method.survey`, in
            layer order) before asking for any decision, and compresses the prompt at the end
            of its forward instead of layer by layer (the prompt's whole KV is held until then,
            as a plain cache holds it).
    """

    def __init__(self, **extra: object) -> None:
        self.extra = extra
        self.exceeded: dict[int, int] = {}
        self.surveys = False

    def report_extra(self) -> dict:
        """Method-specific report fields of this prompt."""
        return dict(self.extra)
