"""Runs a KV method inside an unchanged transformers model.

``Engine`` is what ``method.apply(model)`` returns. While active it
1. switches the text decoder's attention to :func:`hybridkv.attention.hybridkv_attention`
   (the vision tower keeps its own implementation);
2. installs a forward pre-hook on the model that, at the first forward of every prompt, puts
   fresh :class:`~hybridkv.cache.CompressedLayer` objects into the ``Cache`` transformers
   passes (``generate()``'s own ``DynamicCache`` or the user's) and, at every multi-token
   forward, finds what is to be compressed: the *segment* of every sequence (its real tokens,
   its modality spans, the method's :class:`~hybridkv.methods.base.Plan` for it);
3. at the end of each layer's attention in such a forward, asks the method for a decision per
   sequence and compacts the layer (the prompt at the end of its prefill; a later turn — new
   text, new images — into the same cache when it holds visual tokens or at least
   ``min_turn_tokens`` tokens);
4. counts attended entries per step on the host (no synchronisation) for the report.

The engine owns every per-prompt state (plans, spans, counters); the method is configuration.
Leaving the context freezes the report (``method.report``), restores the attention
implementation, removes every hook and drops every reference to the cache; a cache compressed
inside the block refuses to be used after it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from transformers.cache_utils import Cache, DynamicCache

import hybridkv.attention as attention
from hybridkv.budget import tokens_per_head
from hybridkv.cache import ChunkPool, CompressedLayer, ForwardBias, HeadChunks, held_bytes, merge_heads
from hybridkv.cache.chunk_pool import IN_ROW_SLACK
from hybridkv.decisions import LayerContext, Plan
from hybridkv.models.architectures import attention_modules, model_spec, text_config
from hybridkv.report import CacheReport
from hybridkv.rope import token_rotation
from hybridkv.spans import PromptSpans, find_spans

if TYPE_CHECKING:  # the methods import the engine (Method.apply), not the other way round
    from hybridkv.methods.base import Method

Columns = slice | torch.Tensor
"""Positions of a sequence's real tokens: a slice when they are contiguous, else an index tensor."""


@dataclass
class RowSegment:
    """What one sequence compresses in one compression event.

    Attributes:
        columns: its real columns in the layer's uncompressed region.
        query_rows: its real tokens among the forward's Q queries.
        spans: modality spans of the real tokens. tokens_per_head: the budget for them.
        plan: the method's plan for them.
    """

    columns: Columns
    query_rows: Columns
    spans: PromptSpans
    tokens_per_head: int
    plan: Plan


def _real(mask_row: torch.Tensor | None, length: int) -> Columns:
    """Columns of the real (mask 1) tokens of one row: a slice when they are contiguous."""
    if mask_row is None:
        return slice(0, length)
    real = mask_row.nonzero().flatten()
    if real.numel() and int(real[-1] - real[0]) + 1 == real.numel():
        return slice(int(real[0]), int(real[-1]) + 1)
    return real


def _count(columns: Columns) -> int:
    return columns.stop - columns.start if isinstance(columns, slice) else columns.numel()


class Engine:
    """Context manager binding one :class:`~hybridkv.methods.base.Method` to one model.

    Args:
        model: a supported model. method: the method (configuration).
        query_tokens: text prompts: trailing prompt tokens that form the question (0: the
            prompt holds none, the question comes after compression).
        compile: compile each layer's decoding step with ``torch.compile(fullgraph=True)``.
        min_turn_tokens: a later multi-token forward is compressed when it holds visual tokens
            or at least this many tokens.

    Attributes:
        layers: the current prompt's compressed layers (None outside a prompt).
        prefill_mask: (B, 1, L, L) bool causal mask of a padded fresh prompt, else None.
    """

    def __init__(self, model: torch.nn.Module, method: Method, query_tokens: int | None = None,
                 compile: bool = False, min_turn_tokens: int = 256) -> None:
        self.spec = model_spec(model)
        if query_tokens is not None and (isinstance(query_tokens, bool) or not isinstance(query_tokens, int)):
            raise TypeError(f"query_tokens must be an int number of trailing prompt tokens, got {query_tokens!r}.")
        if isinstance(min_turn_tokens, bool) or not isinstance(min_turn_tokens, int) or min_turn_tokens < 1:
            raise ValueError(f"min_turn_tokens must be an int >= 1, got {min_turn_tokens!r}.")
        self.model, self.method, self.query_tokens = model, method, query_tokens
        self.min_turn_tokens = min_turn_tokens
        self.modules = attention_modules(model)
        self.compiled = compile
        self._step = attention.decode_step
        if compile:
            self._step = torch.compile(attention.decode_step, fullgraph=True, dynamic=True)
        self.cache: Cache | None = None
        self.layers: list[CompressedLayer] | None = None
        self.prefill_mask: torch.Tensor | None = None
        self.forward_bias = ForwardBias()
        self._segments: list[RowSegment] | None = None  # the current forward's compression, if any
        self._surveyed: list[list[LayerContext]] | None = None  # its surveyed layers, while a plan surveys
        self._rotation_source, self._rotations = None, []  # the forward's cos tensor and its rows' rotations
        self._history: list[list[RowSegment]] = []  # every compression of the prompt
        self._frozen: CacheReport | None = None
        self._hook = None
        self._saved_impl: str | None = None
        self._attended = self._steps = self._prompt_width = 0

    # ----------------------------------------------------------------- context manager
    def __enter__(self) -> Engine:
        if getattr(self.model, "_hybridkv_engine", None) is not None:
            raise RuntimeError(
                f"{type(self.model._hybridkv_engine.method).__name__} is already applied to this model; "
                "leave its `with method.apply(model):` block before applying another method."
            )
        config = text_config(self.model)
        self._saved_impl = config._attn_implementation_internal
        config._attn_implementation_internal = attention.ATTENTION_NAME
        self.model._hybridkv_engine = self
        for module in self.modules:
            module._hybridkv_engine = self
        self._hook = self.model.register_forward_pre_hook(self._before_forward, with_kwargs=True)
        self.method.publish(self)
        return self

    def __exit__(self, *exc) -> None:
        self._hook.remove()
        text_config(self.model)._attn_implementation_internal = self._saved_impl
        for module in self.modules:
            del module._hybridkv_engine
        del self.model._hybridkv_engine
        self._end_prompt()
        self.method.publish(self._frozen)

    @property
    def report(self) -> CacheReport | None:
        """The current prompt's report (computed now), or the one frozen when it ended."""
        if self.layers is not None and self.layers[-1].compressions:
            return self._build_report()
        return self._frozen

    # ----------------------------------------------------------------- per forward
    def _before_forward(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """Give every new prompt fresh compressed layers; find what this forward compresses."""
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        embeds = kwargs.get("inputs_embeds")
        batch, q_len = (input_ids.shape if input_ids is not None else embeds.shape[:2])
        mask = kwargs.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.ndim != 2:
            raise ValueError("hybridkv needs the 2D (batch, tokens) attention mask of padding, not a 4D mask: it builds "
                             "the per-head masks of the compressed cache itself.")
        cache = kwargs.get("past_key_values")
        if cache is None:
            if kwargs.get("use_cache") is False:
                raise ValueError("hybridkv compresses the KV cache: call the model with use_cache=True.")
            cache = kwargs["past_key_values"] = DynamicCache(config=self.model.config)
        if cache.get_seq_length() == 0:
            self._begin_prompt(cache, input_ids)
        elif cache is not self.cache:
            raise ValueError(
                "this cache was filled outside the active hybridkv method; start from an empty cache "
                "(or none) inside `with method.apply(model):`."
            )
        elif batch != self.layers[0].batch:
            raise ValueError(f"this forward has {batch} sequences but the cache holds {self.layers[0].batch}; feed "
                             "every sequence of the batch (or use the cache's batch_select_indices first).")
        self._begin_forward(input_ids, mask if isinstance(mask, torch.Tensor) else None, batch, q_len)
        return args, kwargs

    def _begin_prompt(self, cache: Cache, input_ids: torch.Tensor | None) -> None:
        if self.spec.is_multimodal and input_ids is None:
            raise ValueError(
                "hybridkv needs input_ids (not inputs_embeds) for a vision-language prompt to find its visual tokens."
            )
        self._end_prompt()
        self.layers = [CompressedLayer(self.spec.num_kv_heads, self.forward_bias) for _ in range(self.spec.num_layers)]
        cache.layers = self.layers
        cache.layer_class_to_replicate = None
        self.cache = cache
        self._history, self._attended, self._steps = [], 0, 0

    def _end_prompt(self) -> None:
        """Freeze the current prompt's report and let go of its cache."""
        if self.layers is None:
            return
        if self.layers[-1].compressions:
            self._frozen = self._build_report()
        for layer in self.layers:
            layer.detached = True
        self.cache = self.layers = None
        self._segments, self._history, self.prefill_mask = None, [], None

    def _begin_forward(self, input_ids: torch.Tensor | None, mask: torch.Tensor | None, batch: int, q_len: int) -> None:
        """Set the new tokens' bias; for a multi-token forward (or a prompt), decide what it compresses."""
        self.forward_bias.set(mask, batch, q_len, self.model.dtype, self.model.device)
        first = self.layers[0]
        fresh = first.seen == 0
        self._segments, self._surveyed, self.prefill_mask = None, None, None
        self._rotation_source, self._rotations = None, []
        if not fresh and q_len == 1:
            return
        if fresh and mask is not None and not bool(mask.all()):
            real = mask.to(torch.bool)
            causal = torch.ones(q_len, q_len, dtype=torch.bool, device=real.device).tril()
            eye = torch.eye(q_len, dtype=torch.bool, device=real.device)  # padded rows see themselves: no NaN
            self.prefill_mask = ((causal & real[:, None, None, :]) | eye).to(self.model.device)
        if fresh:
            self._prompt_width = q_len  # the (padded) prompt
        earlier = 0 if fresh else first.stored - first.kept_width  # uncompressed tokens before this forward
        segments = []
        for b in range(batch):
            columns = _real(None if mask is None else mask[b, -(earlier + q_len):], earlier + q_len)
            rows = _real(None if mask is None else mask[b, -q_len:], q_len)
            ids = None
            if input_ids is not None:
                ids = torch.cat([torch.full((earlier,), -1, dtype=input_ids.dtype, device=input_ids.device), input_ids[b]])
                ids = ids[columns][None]
            length = _count(columns)
            spans = find_spans(ids, length, self.spec, self.query_tokens if fresh else None)
            if not fresh and spans.visual_tokens == 0 and length < self.min_turn_tokens:
                return  # a short text-only turn (e.g. a prompt tail): attended, not compressed
            budget = tokens_per_head(self.method.budget, length, first=fresh)
            segments.append(RowSegment(columns, rows, spans, budget, self.method.plan(self.spec, spans, budget)))
        self._segments = segments
        self._surveyed = [] if any(row.plan.surveys for row in segments) else None
        self._history.append(segments)

    # ----------------------------------------------------------------- called by attention
    def decode(self, layer: CompressedLayer, query: torch.Tensor, scaling: float) -> torch.Tensor:
        """One decoding step of ``layer``: (B, Hq, 1, D) -> (B, 1, Hq, D).

        Eager, the attention reads the stored columns only; compiled, it reads the whole buffer
        (shapes change only when the layer grows; unused columns have a ``-inf`` bias). A host
        store picks its chunks outside the step (its copy needs the picks on the host).
        """
        retriever = layer.retriever
        pool = None
        if retriever is not None:
            if retriever.store == "host":
                grouped = query.view(layer.batch, layer.kv_heads, -1, query.shape[-1])
                retriever.fill(layer.keys, layer.values, layer.bias, grouped)
            else:
                pool = retriever.step(layer.keys.shape[2])
        stored = None if self.compiled else layer.stored
        out, chunks = self._step(query, layer.keys, layer.values, layer.bias, scaling, pool, stored)
        if chunks is not None:
            retriever.last_picks = chunks
        return out

    def after_attention(self, layer_idx: int, query: torch.Tensor, scaling: float) -> None:
        """Count this forward's attended entries; compress the layer if the forward is a compression event.

        Args:
            query: (B, Hq, Q, D) the forward's queries after RoPE.
        """
        layer = self.layers[layer_idx]
        q_len = query.shape[-2]
        if layer.stored != q_len or layer.compressions:  # attended through a compressed layer
            self._steps += q_len
            self._attended += q_len * (layer.kept_attended + layer.batch * layer.kv_heads * (layer.stored - layer.kept_width))
        if self._segments is not None:
            self.compress_layer(layer_idx, query, scaling)

    def compress_layer(self, layer_idx: int, query: torch.Tensor, scaling: float, memo: dict | None = None) -> None:
        """Let the method decide, per sequence, what the layer keeps of its uncompressed region,
        then compact the layer (and give it a retrieval pool when heads retrieve); ``memo`` is
        :attr:`LayerContext.memo`.

        When a plan surveys (:attr:`~hybridkv.decisions.Plan.surveys`), the layer is only shown to
        the method now, and every layer is decided and compacted after the last one; the held
        contexts keep only their text-prior query rows (``spans.query_start`` on).
        """
        contexts = self._contexts(layer_idx, query, scaling, memo)
        if self._surveyed is None:
            self._compact(layer_idx, contexts)
            return
        for ctx, row in zip(contexts, self._segments):
            self.method.survey(ctx, row.plan)
        self._surveyed.append(contexts)
        if layer_idx == len(self.layers) - 1:
            for idx, held in enumerate(self._surveyed):
                self._compact(idx, held)
            self._surveyed = None

    def _contexts(self, layer_idx: int, query: torch.Tensor, scaling: float, memo: dict | None) -> list[LayerContext]:
        """Per sequence, the :class:`LayerContext` of the layer's uncompressed region."""
        layer = self.layers[layer_idx]
        seg_keys, seg_values = layer.segment()  # (B, H, S, D)
        rotations = self._row_rotations(layer, seg_keys.shape[2] == query.shape[2])
        contexts = []
        for b, row in enumerate(self._segments):
            keys, values = seg_keys[b][:, row.columns], seg_values[b][:, row.columns]
            ctx = LayerContext(layer_idx, self.spec, query[b][:, row.query_rows], keys, values, scaling, row.spans,
                               row.tokens_per_head, memo, rotations[b])
            if self._surveyed is not None:  # held until the last layer: the text-prior rows alone
                ctx.queries = ctx.queries[:, ctx.prior_row :].clone()
            contexts.append(ctx)
        return contexts

    def _compact(self, layer_idx: int, contexts: list[LayerContext]) -> None:
        """Ask the method for each sequence's decision on the layer and compact it."""
        layer = self.layers[layer_idx]
        width = layer.segment()[0].shape[2]
        keep = torch.zeros(layer.batch, layer.kv_heads, width, dtype=torch.bool, device=layer.device)
        chunks: list[list[HeadChunks]] = []
        store, observer = "device", None
        for b, (row, ctx) in enumerate(zip(self._segments, contexts)):
            decision = self.method.compress(ctx, row.plan)
            keep[b][:, row.columns] = decision.keep
            columns = torch.arange(width, device=ctx.keys.device)[row.columns]
            chunks.append([HeadChunks(r.head, ctx.keys[r.head][r.positions], ctx.values[r.head][r.positions],
                                      (layer.first_uncompressed + columns[r.positions]).to(torch.int32), r.select)
                           for r in decision.chunks])
            store, observer = decision.store, decision.observer
        if layer.retriever is not None:
            old = layer.retriever.head_chunks(layer.keys, layer.values)
            chunks = [before + now for before, now in zip(old, chunks)]
        rows = merge_heads(chunks)
        slots = pooled = None
        if any(rows):
            slots = torch.zeros(layer.batch, layer.kv_heads, dtype=torch.long)
            pooled = torch.zeros_like(slots)
            for b, row in enumerate(rows):
                for item in row:
                    slots[b, item.head] = item.select * item.keys.shape[1]
                    pooled[b, item.head] = item.keys.shape[0] * item.keys.shape[1]
            kept = keep.sum(-1).cpu() + (layer.kept_positions >= 0).sum(-1).cpu()
            if store == "device" and int((kept + pooled).max()) <= IN_ROW_SLACK * int((kept + slots).max()):
                slots = None  # the pools go into their rows; a step opens the picked chunks in the bias
            else:
                pooled = None  # the pools keep their own storage; a step copies the picks into slots
        start = layer.compact(keep, slots, pooled)
        layer.retriever = None
        if any(rows):
            in_row = (layer.keys, layer.values) if pooled is not None else None
            layer.retriever = ChunkPool(rows, layer.kv_heads, start, layer.kept_width - 1, store, in_row)
            if in_row is not None:
                layer.kept_attended += layer.retriever.attended_tokens()
        layer.observer = observer

    def _row_rotations(self, layer: CompressedLayer, whole: bool) -> list:
        """Per sequence, the ((S, D), (S, D)) RoPE rotation of its segment keys, or None each
        (:attr:`LayerContext.rotation`). ``whole``: the segment is this forward's tokens. Every
        layer of a forward gets the same ``cos``/``sin`` tensors from the model, so the rows are
        read once per forward (again only where a layer's tensors differ, e.g. on another device)."""
        source, layer.rotation = layer.rotation, None
        if source is None or not whole:
            return [None] * len(self._segments)
        if self._rotation_source is not source[0]:
            rotation = token_rotation(*source, self.spec.mrope_section)  # (B or 1, S, D) each
            self._rotations = [None if rotation is None else
                               tuple(t[b if t.shape[0] > 1 else 0][row.columns] for t in rotation)
                               for b, row in enumerate(self._segments)]
            self._rotation_source = source[0]
        return self._rotations

    def cache_from_prefill(self, capture) -> DynamicCache:
        """A cache for the captured prompt, compressed by this engine's method layer by layer,
        as if the prompt had been prefilled under it (the prefill attention itself is full for
        every method, so the prefill's logits are shared too). Decode with it inside this context.

        Args:
            capture: a :class:`hybridkv.harness.PrefillCapture` of the same model (batch 1).
        """
        cache = DynamicCache()
        ids = capture.input_ids
        self._begin_prompt(cache, ids)
        self._begin_forward(ids, None, 1, ids.shape[1])
        rope = None if capture.rotation is None else {"cos": capture.rotation[0][None], "sin": capture.rotation[1][None]}
        for idx, (queries, keys, values) in enumerate(capture.layers):
            self.layers[idx].update(keys[None], values[None], rope)
            self.compress_layer(idx, queries[None], capture.scaling, capture.memo)
        self._segments = None
        return cache

    # ----------------------------------------------------------------- report
    def _build_report(self) -> CacheReport:
        """The report of the current prompt (synchronises: it reads tensors)."""
        spec, layers = self.spec, self.layers
        batch, seen = layers[0].batch, layers[0].seen
        element = layers[0].dtype.itemsize
        held = sum(sum(held_bytes(layer).values()) for layer in layers)
        offloaded = sum(getattr(layer.retriever, "offloaded_bytes", 0) for layer in layers)
        stored = [layer.stored_per_head() for layer in layers]  # (layers, B, H)
        per_token = spec.num_layers * spec.num_kv_heads * spec.head_dim * 2 * element
        attended = self._attended / max(1, self._steps) / (batch * spec.num_kv_heads)
        generated = seen - self._prompt_width
        sequences = []
        for b, origin in enumerate(layers[0].origins):
            # a compression made before the cache was repeated or narrowed is indexed by prompt row
            mine = [segments[b] if len(segments) == batch else segments[origin] for segments in self._history]
            row = mine[0]
            extra = row.plan.report_extra()
            later = [segment.plan.report_extra() for segment in mine[1:]]
            if later:
                extra["later_turns"] = later
            heads = [layer_rows[b] for layer_rows in stored]
            sequences.append(CacheReport(
                method=type(self.method).__name__, budget=self.method.budget, batch_size=1,
                prompt_tokens=row.spans.prompt_len, visual_tokens=row.spans.visual_tokens,
                context_tokens=int(row.spans.context.sum()), query_tokens=row.spans.query_len,
                query_source=row.spans.query_source, generated_tokens=generated,
                full_kv_bytes=seen * per_token, resident_kv_bytes=(held - offloaded) // batch,
                offloaded_kv_bytes=offloaded // batch, attended_tokens_per_step=attended,
                layer_budgets=[sum(h) for h in heads], head_budgets=heads,
                head_types=extra.pop("head_types", None), profile_source=extra.pop("profile_source", None),
                compressions=len(self._history),
                budget_exceeded_tokens=sum(sum(segment.plan.exceeded.values()) for segment in mine),
                extra=extra,
            ))
        if batch == 1:
            return sequences[0]
        total = [[sum(s.head_budgets[i][h] for s in sequences) for h in range(spec.num_kv_heads)]
                 for i in range(spec.num_layers)]
        return CacheReport(
            method=type(self.method).__name__, budget=self.method.budget, batch_size=batch,
            prompt_tokens=sum(s.prompt_tokens for s in sequences), visual_tokens=sum(s.visual_tokens for s in sequences),
            context_tokens=sum(s.context_tokens for s in sequences), query_tokens=sum(s.query_tokens for s in sequences),
            query_source=",".join(dict.fromkeys(s.query_source for s in sequences)), generated_tokens=generated,
            full_kv_bytes=batch * seen * per_token, resident_kv_bytes=held - offloaded, offloaded_kv_bytes=offloaded,
            attended_tokens_per_step=attended, layer_budgets=[sum(h) for h in total], head_budgets=total,
            compressions=len(self._history), budget_exceeded_tokens=sum(s.budget_exceeded_tokens for s in sequences),
            sequences=sequences,
        )
