"""Runs a KV method inside an unchanged transformers model.

``Engine`` is what ``method.apply(model)`` returns. While active it
1. switches the text decoder's attention to :func:`hybridkv.attention.hybridkv_attention`
   (the vision tower keeps its own implementation);
2. installs a forward pre-hook on the model that, at the first forward of every prompt, puts
   fresh :class:`~hybridkv.cache.CompressedLayer` objects into the ``Cache`` transformers
   passes (``generate()``'s own ``DynamicCache`` or the user's), finds the modality spans and
   checks the input (batch size 1, no padding);
3. at the end of each layer's prefill, hands the layer to ``method.compress``;
4. counts attended tokens per decoding step for the report.
Leaving the context restores the attention implementation and removes every hook, so
``generate()`` afterwards runs plain.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicCache

from hybridkv import attention
from hybridkv.cache import CompressedLayer, held_bytes
from hybridkv.methods.base import LayerContext, Method, tokens_per_head
from hybridkv.models.architectures import attention_modules, model_spec, text_config
from hybridkv.report import CacheReport
from hybridkv.spans import PromptSpans, find_spans


class Engine:
    """Context manager binding one :class:`~hybridkv.methods.base.Method` to one model."""

    def __init__(self, model: torch.nn.Module, method: Method, query_tokens: int | None = None) -> None:
        self.spec = model_spec(model)
        if query_tokens is not None and (isinstance(query_tokens, bool) or not isinstance(query_tokens, int)):
            raise TypeError(f"query_tokens must be an int number of trailing prompt tokens, got {query_tokens!r}.")
        self.model, self.method, self.query_tokens = model, method, query_tokens
        self.modules = attention_modules(model)
        self.cache: Cache | None = None
        self.spans: PromptSpans | None = None
        self._hook = None
        self._saved_impl: str | None = None
        self._steps = 0
        self._attended = 0

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
        self.method._engine = self
        return self

    def __exit__(self, *exc) -> None:
        self._hook.remove()
        text_config(self.model)._attn_implementation_internal = self._saved_impl
        for module in self.modules:
            del module._hybridkv_engine
        del self.model._hybridkv_engine

    # ----------------------------------------------------------------- per forward
    def _before_forward(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """Give every new prompt fresh compressed layers; check the cache of later steps."""
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        embeds = kwargs.get("inputs_embeds")
        batch, length = (input_ids.shape if input_ids is not None else embeds.shape[:2])
        if batch != 1:
            raise ValueError(f"hybridkv supports batch size 1 for now (got {batch}); call generate() once per prompt.")
        mask = kwargs.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.ndim == 2 and not bool(mask.all()):
            raise ValueError("hybridkv does not support padded inputs yet: pass the prompt without padding.")
        cache = kwargs.get("past_key_values")
        if cache is None:
            if kwargs.get("use_cache") is False:
                raise ValueError("hybridkv compresses the KV cache: call the model with use_cache=True.")
            cache = kwargs["past_key_values"] = DynamicCache(config=self.model.config)
        if cache.get_seq_length() == 0:
            self._begin_prompt(cache, input_ids, length)
        elif cache is not self.cache:
            raise ValueError(
                "this cache was filled outside the active hybridkv method; start from an empty cache "
                "(or none) inside `with method.apply(model):`."
            )
        return args, kwargs

    def _begin_prompt(self, cache: Cache, input_ids: torch.Tensor | None, length: int) -> None:
        if self.spec.is_multimodal and input_ids is None:
            raise ValueError(
                "hybridkv needs input_ids (not inputs_embeds) for a vision-language prompt to find its visual tokens."
            )
        self.spans = find_spans(input_ids, length, self.spec, self.query_tokens)
        self.tokens_per_head = tokens_per_head(self.method.budget, length)
        cache.layers = [CompressedLayer(self.spec.num_kv_heads) for _ in range(self.spec.num_layers)]
        cache.layer_class_to_replicate = None
        self.cache = cache
        self._steps = self._attended = 0
        self.method.begin_prompt(self.spec, self.spans, self.tokens_per_head)

    def cache_from_prefill(self, capture) -> DynamicCache:
        """A cache for the captured prompt, compressed by this engine's method layer by layer,
        as if the prompt had been prefilled under it (the prefill attention itself is full for
        every method, so the prefill's logits are shared too). Decode with it inside this context.

        Args:
            capture: a :class:`hybridkv.harness.PrefillCapture` of the same model.
        """
        cache = DynamicCache()
        self._begin_prompt(cache, capture.input_ids, capture.input_ids.shape[1])
        for idx, (queries, keys, values) in enumerate(capture.layers):
            cache.layers[idx].update(keys[None], values[None])
            self.compress_layer(idx, queries, capture.scaling, cache.layers[idx])
        return cache

    # ----------------------------------------------------------------- called by attention
    def layer(self, layer_idx: int) -> CompressedLayer:
        """The compressed layer ``layer_idx`` of the current prompt's cache."""
        return self.cache.layers[layer_idx]

    def compress_layer(self, layer_idx: int, queries: torch.Tensor, scaling: float, layer: CompressedLayer) -> None:
        """Let the method compress ``layer`` (holding the whole prompt) once its prefill attention is done.

        Args:
            queries: (Hq, L, D) prompt queries after RoPE.
        """
        keys, values = layer.recent()
        ctx = LayerContext(layer_idx, self.spec, queries, keys[0], values[0], scaling, self.spans, self.tokens_per_head)
        self.method.compress(ctx, layer)

    def record_step(self, layer_idx: int, attended: int, q_len: int) -> None:
        """Count the entries attended (summed over KV heads) by one layer for ``q_len`` queries."""
        self._steps += q_len
        self._attended += attended * q_len

    # ----------------------------------------------------------------- report
    def report(self) -> CacheReport | None:
        """Figures of the current (last) prompt's cache."""
        if self.cache is None or not self.cache.layers[-1].compressed:
            return None
        spec, layers = self.spec, self.cache.layers
        seen = layers[0].seen
        element = layers[0].dtype.itemsize
        held = sum(sum(held_bytes(layer).values()) for layer in layers)
        # A retriever that keeps its chunk pool in host memory says how many of those bytes it holds.
        offloaded = sum(getattr(layer.retriever, "offloaded_bytes", 0) for layer in layers)
        stored = [layer.stored_per_head() for layer in layers]
        extra = self.method.report_extra()
        return CacheReport(
            method=type(self.method).__name__,
            budget=self.method.budget,
            prompt_tokens=self.spans.prompt_len,
            visual_tokens=self.spans.visual_tokens,
            context_tokens=int(self.spans.context.sum()),
            query_tokens=self.spans.query_len,
            query_source=self.spans.query_source,
            generated_tokens=seen - self.spans.prompt_len,
            full_kv_bytes=seen * spec.num_layers * spec.num_kv_heads * spec.head_dim * 2 * element,
            resident_kv_bytes=held - offloaded,
            offloaded_kv_bytes=offloaded,
            attended_tokens_per_step=self._attended / max(1, self._steps) / spec.num_kv_heads,
            layer_budgets=[sum(heads) for heads in stored],
            head_budgets=stored,
            head_types=extra.pop("head_types", None),
            profile_source=extra.pop("profile_source", None),
            extra=extra,
        )
