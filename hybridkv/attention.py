"""Exact softmax attention over a layer whose KV heads keep different numbers of tokens.

Registered in transformers' ``AttentionInterface`` as ``"hybridkv"``; :mod:`hybridkv.engine`
switches a model's text decoder to it inside ``method.apply(model)``.

* Prefill (the layer holds only the uncompressed prompt): plain causal SDPA over the prompt,
  then the engine lets the method compress the layer (layer by layer, so at most one layer's
  full prompt KV exists at a time).
* Later forwards: every query head attends over its KV head's kept prompt entries (flat
  storage, see :class:`~hybridkv.cache.CompressedLayer`), the entries a retriever adds for this
  step, and the recent block (causal inside it). All parts share one softmax, so the result is
  exactly softmax attention over the kept entries.

The flat part is computed for all heads with one matrix product ``(N, D) @ (D, Hq*Q)`` and a
mask that keeps only each entry's own head: this reads every kept key once (decoding is
memory-bound) and has no Python loop over heads.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

ATTENTION_NAME = "hybridkv"


def flat_logits(
    keys: torch.Tensor, heads: torch.Tensor, query: torch.Tensor, scaling: float, group: int
) -> torch.Tensor:
    """Scaled logits of every query head over flat entries, ``-inf`` where the head differs.

    Args:
        keys: (N, D) flat keys. heads: (N,) KV head of each entry.
        query: (Hq, Q, D) queries. group: query heads per KV head.
    Returns:
        (Hq * Q, N) float32 logits, rows ordered (query head, query).
    """
    hq, q_len, dim = query.shape
    logits = (query.reshape(hq * q_len, dim) @ keys.T).float() * scaling  # (Hq*Q, N)
    row_head = torch.arange(hq, device=keys.device).repeat_interleave(q_len) // group  # (Hq*Q,)
    return logits.masked_fill(row_head[:, None] != heads[None, :].long(), float("-inf"))


def attend_layer(layer, query: torch.Tensor, scaling: float) -> tuple[torch.Tensor, int]:
    """Attention of ``query`` over a compressed layer (prefix + retrieved + recent entries).

    Parts with the same length for every head (the recent block, and the prefix when the
    method kept the same number of tokens per head) are attended as (Hkv, n, D) blocks with a
    batched product; parts with per-head lengths through :func:`flat_logits`.

    Args:
        layer: a compressed :class:`~hybridkv.cache.CompressedLayer` (batch 1).
        query: (1, Hq, Q, D) queries after RoPE; the Q newest recent tokens are their own.
        scaling: softmax scale.
    Returns:
        ((1, Q, Hq, D) output in the query dtype, total entries attended summed over KV heads).
    """
    _, hq, q_len, dim = query.shape
    kv_heads = layer.kv_heads
    group = hq // kv_heads
    q = query[0]  # (Hq, Q, D)
    if layer.observer is not None:
        layer.observer(q, layer)
    recent_k, recent_v = layer.recent()  # (1, Hkv, T, D)
    blocks = [(recent_k[0], recent_v[0])]  # (Hkv, n, D) parts; the recent block first
    flat = []  # (keys (N, D), values (N, D), heads (N,)) parts
    if layer.uniform:  # sorted by head: a free (Hkv, n, D) view
        blocks.append((layer.prefix_keys.view(kv_heads, -1, dim), layer.prefix_values.view(kv_heads, -1, dim)))
    else:
        flat.append((layer.prefix_keys, layer.prefix_values, layer.prefix_heads))
    if layer.retriever is not None:
        flat.append(layer.retriever.extra_entries(q))
    flat = [part for part in flat if part[0].shape[0] > 0]

    q_grouped = q.reshape(kv_heads, group * q_len, dim)  # rows (g, q) per KV head
    parts = [(q_grouped @ k.transpose(1, 2)).float().mul_(scaling).reshape(hq * q_len, -1) for k, _ in blocks]
    t_len = recent_k.shape[-2]
    if q_len > 1:  # query i sits at recent slot t_len - q_len + i; rows are ordered (head, g, q)
        query_slot = torch.arange(t_len - q_len, t_len, device=q.device).repeat(hq)  # (Hq*Q,)
        future = torch.arange(t_len, device=q.device)[None, :] > query_slot[:, None]
        parts[0] = parts[0].masked_fill(future, float("-inf"))
    parts += [flat_logits(k, h, q, scaling, group) for k, _, h in flat]
    probs = torch.softmax(torch.cat(parts, dim=1), dim=1).to(recent_v.dtype)  # (Hq*Q, total)

    chunks = probs.split([p.shape[1] for p in parts], dim=1)
    out = torch.zeros(kv_heads, group * q_len, dim, dtype=recent_v.dtype, device=q.device)
    for (_, values), p in zip(blocks, chunks):
        out = out + torch.bmm(p.reshape(kv_heads, group * q_len, -1), values)
    out = out.reshape(hq * q_len, dim)
    for (_, values, _), p in zip(flat, chunks[len(blocks):]):
        out = out + p @ values
    attended = sum(k.shape[0] * k.shape[1] for k, _ in blocks) + sum(k.shape[0] for k, _, _ in flat)
    return out.reshape(1, hq, q_len, dim).transpose(1, 2), attended


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
    """The ``AttentionInterface`` entry point: (1, Hq, Q, D) queries -> (1, Q, Hq, D) output.

    The parameter order is transformers' own (``sdpa_attention_forward``): wrappers such as
    kvpress's attention patch pass ``dropout`` positionally.

    ``key``/``value`` are what the cache layer's ``update`` returned; the layer itself (found
    through the engine attached to ``module``) is the source of truth.
    """
    engine = module._hybridkv_engine
    layer = engine.layer(module.layer_idx)
    scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
    if not layer.compressed:
        if key.shape[-2] != query.shape[-2]:
            raise RuntimeError("hybridkv: the first forward of a prompt must prefill it whole (no chunked prefill).")
        out = F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling, enable_gqa=True)
        engine.compress_layer(module.layer_idx, query[0], scaling, layer)
        return out.transpose(1, 2).contiguous(), None
    out, attended = attend_layer(layer, query, scaling)
    engine.record_step(module.layer_idx, attended, query.shape[-2])
    return out.contiguous(), None


AttentionInterface.register(ATTENTION_NAME, hybridkv_attention)
