"""Exact softmax attention over a layer whose rows keep different entries.

Registered in transformers' ``AttentionInterface`` as ``"hybridkv"``; :mod:`hybridkv.engine`
switches a model's text decoder to it inside ``method.apply(model)``.

* A fresh prompt (the layer holds only the forward's own tokens): plain causal SDPA, then the
  engine compresses the layer (layer by layer, so at most one layer's uncompressed prompt KV
  exists at a time).
* A decoding step (one token): :func:`decode_step` — the layer's retriever writes this step's
  chunks into its retrieval slots, then one SDPA call reads the layer's rectangle in place,
  its queries grouped by KV head ``(B, H, G, D)`` so that the per-row bias ``(B, H, 1, n)``
  broadcasts over each head's queries. A small constant number of ops, whatever the number of
  heads, parts or chunks; no host synchronisation (device store); ``torch.compile``-able.
* A later multi-token forward (a prompt tail, a new turn): the same, with a causal mask among
  its own tokens, built for blocks of query rows so that the mask stays small.

SDPA's kernels accumulate logits and softmax in float32 whatever the keys' dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

from hybridkv.cache.chunk_pool import PoolStep, retrieve

ATTENTION_NAME = "hybridkv"

MASK_BYTES = 64 * 2**20
"""Largest attention mask a multi-token forward into a compressed cache builds at a time."""


def decode_step(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, bias: torch.Tensor, scaling: float,
                pool: PoolStep | None = None, stored: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One token's attention over a compressed layer, retrieval included (a pure function of
    tensors: ``torch.compile(fullgraph=True)`` traces it).

    Args:
        query: (B, Hq, 1, D) after RoPE. keys / values / bias: (B, H, capacity, D) /
            (B, H, 1, capacity) the layer's buffers; retrieval writes its slots or opens its
            picked chunks in the bias in place.
        pool: the layer's retrieval step (:meth:`~hybridkv.cache.ChunkPool.step`), or None.
        stored: attend the first ``stored`` columns only (None: the whole buffer, whose unused
            columns have a ``-inf`` bias; the compiled step does so, keeping shapes static).
    Returns:
        ((B, 1, Hq, D) output in the query's dtype, the picked chunks or None).
    """
    batch, hq, _, dim = query.shape
    grouped = query.view(batch, keys.shape[1], hq // keys.shape[1], dim)  # (B, H, G, D)
    chunks = retrieve(keys, values, bias, grouped, pool) if pool is not None else None
    if stored is not None:
        keys, values, bias = keys[:, :, :stored], values[:, :, :stored], bias[..., :stored]
    out = F.scaled_dot_product_attention(grouped, keys, values, attn_mask=bias, scale=scaling)
    return out.view(batch, 1, hq, dim), chunks


def segment_attention(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, bias: torch.Tensor, stored: int,
                      scaling: float, retriever=None) -> torch.Tensor:
    """Attention of a multi-token forward's queries over a compressed layer.

    The Q queries are the last Q stored columns; query ``i`` sees every attendable kept entry
    and the uncompressed columns up to its own. One retrieval for the whole forward (the bound
    is the max over all its query rows).

    Args:
        query: (B, Hq, Q, D). keys / values: (B, H, capacity, D) the layer's buffers.
        bias: (B, H, 1, capacity). stored: the columns in use.
    Returns:
        (B, Q, Hq, D).
    """
    batch, hq, q_len, dim = query.shape
    kv_heads, n = keys.shape[1], stored
    group = hq // kv_heads
    if retriever is not None:
        retriever.fill(keys, values, bias, query.reshape(batch, kv_heads, group * q_len, dim))
    keys, values, bias = keys[:, :, :n], values[:, :, :n], bias[..., :n]
    rows = max(1, MASK_BYTES // (batch * hq * n * bias.element_size()))
    columns = torch.arange(n, device=keys.device)
    out = []
    for first in range(0, q_len, rows):
        last = min(first + rows, q_len)
        block = query[:, :, first:last].reshape(batch, kv_heads, group * (last - first), dim)  # rows (g, q)
        seen = n - q_len + torch.arange(first, last, device=keys.device)  # each query's own column
        future = (columns[None, :] > seen[:, None]).repeat(group, 1)  # (G * rows, n)
        mask = bias.masked_fill(future, float("-inf"))  # (B, H, G * rows, n)
        part = F.scaled_dot_product_attention(block, keys, values, attn_mask=mask, scale=scaling)
        out.append(part.view(batch, hq, last - first, dim))
    return torch.cat(out, dim=2).transpose(1, 2)


def prefill_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
                      scaling: float) -> torch.Tensor:
    """Causal attention of a fresh prompt over its own tokens: (B, Hq, L, D) -> (B, L, Hq, D).

    Args:
        mask: (B, 1, L, L) bool (True: attend) when the batch has padding, else None.
    """
    if mask is None:
        out = F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling, enable_gqa=True)
    else:
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask.to(query.device), scale=scaling,
                                             enable_gqa=True)
    return out.transpose(1, 2)


def hybridkv_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """The ``AttentionInterface`` entry point: (B, Hq, Q, D) queries -> (B, Q, Hq, D) output.

    The parameter order is transformers' own (``sdpa_attention_forward``): wrappers such as
    kvpress's attention patch pass ``dropout`` positionally. ``key``/``value`` are what the
    cache layer's ``update`` returned; the layer (found through the engine attached to
    ``module``) is the source of truth for everything else.
    """
    engine = module._hybridkv_engine
    layer = engine.layers[module.layer_idx]
    scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
    q_len = query.shape[-2]
    if layer.observer is not None:
        layer.observer(query, layer)
    if layer.stored == q_len:
        out = prefill_attention(query, key, value, engine.prefill_mask, scaling)
    elif q_len == 1:
        out = engine.decode(layer, query, scaling)
    else:
        out = segment_attention(query, layer.keys, layer.values, layer.bias, layer.stored, scaling, layer.retriever)
    engine.after_attention(module.layer_idx, query, scaling)
    return out, None


AttentionInterface.register(ATTENTION_NAME, hybridkv_attention)
