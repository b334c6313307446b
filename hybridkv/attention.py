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

Each part is a batch of P blocks, every block belonging to one KV head: the recent block and a
uniform prefix are ``(kv_heads, n, D)``; a non-uniform prefix is its ``(tiles, tile_rows, D)``
tiles plus a small remainder; retrieved chunks are one block per retrieving head. A block is
multiplied only with its own head's queries (one batched product per part, no Python loop
over heads), and the parts are merged by a softmax over segments: per-head maxima
(``scatter_reduce``), then exponentials, sums and weighted values added per head
(``index_add``). Every kept key is read once and no work is spent on other heads' entries.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

ATTENTION_NAME = "hybridkv"


@dataclass
class Part:
    """Logits of one batch of blocks against their heads' queries.

    Attributes:
        heads: (P,) long KV head of each block, or None for one block per head in order.
        logits: (P, R, n) float32 scaled logits, R = query rows per KV head (group x Q);
            ``-inf`` where an entry must not be seen.
        values: (P, n, D) values, or (n, D) shared by all blocks.
        entries: real (unmasked) entries of the part, summed over heads (for the report).
    """

    heads: torch.Tensor | None
    logits: torch.Tensor
    values: torch.Tensor
    entries: int


def _block(q_grouped: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scaling: float,
           heads: torch.Tensor | None = None, valid: torch.Tensor | None = None) -> Part:
    """Part of blocks ``keys``/``values`` (P, n, D) owned by ``heads`` (None: one per head in order)."""
    q = q_grouped if heads is None else q_grouped[heads]  # (P, R, D)
    logits = torch.bmm(q, keys.transpose(1, 2)).float().mul_(scaling)  # (P, R, n)
    entries = keys.shape[0] * keys.shape[1]
    if valid is not None:
        logits = logits.masked_fill(~valid[:, None, :], float("-inf"))
        entries = int(valid.sum())
    return Part(heads, logits, values, entries)


def _shared(q_grouped: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, owner: torch.Tensor,
            scaling: float) -> Part:
    """Part of a few flat entries (N, D) of mixed heads ``owner`` (N,): every head, others masked."""
    kv_heads, rows, dim = q_grouped.shape
    logits = (q_grouped.reshape(-1, dim) @ keys.T).float().mul_(scaling).view(kv_heads, rows, -1)
    mine = torch.arange(kv_heads, device=keys.device)[:, None] == owner[None, :].long()  # (Hkv, N)
    return Part(None, logits.masked_fill(~mine[:, None, :], float("-inf")), values, keys.shape[0])


def merge(parts: list[Part], kv_heads: int) -> torch.Tensor:
    """Softmax over all parts' entries of each head and query row; (kv_heads, R, D) float32."""
    rows = parts[0].logits.shape[1]
    device = parts[0].logits.device
    top = torch.full((kv_heads, rows), float("-inf"), device=device)
    for part in parts:
        peak = part.logits.amax(dim=-1)  # (P, R)
        if part.heads is None:
            top = torch.maximum(top, peak)
        else:
            top.scatter_reduce_(0, part.heads[:, None].expand_as(peak), peak, "amax")
    total = torch.zeros(kv_heads, rows, device=device)
    out = torch.zeros(kv_heads, rows, parts[0].values.shape[-1], device=device)
    for part in parts:
        weights = torch.exp(part.logits - (top if part.heads is None else top[part.heads])[..., None])
        p = weights.to(part.values.dtype)
        if part.values.dim() == 2:  # shared values (n, D)
            mixed = (p.reshape(-1, p.shape[-1]) @ part.values).view(*p.shape[:2], -1)
        else:
            mixed = torch.bmm(p, part.values)
        if part.heads is None:
            total += weights.sum(-1)
            out += mixed.float()
        else:
            total.index_add_(0, part.heads, weights.sum(-1))
            out.index_add_(0, part.heads, mixed.float())
    return out / total[..., None]


def attend_layer(layer, query: torch.Tensor, scaling: float) -> tuple[torch.Tensor, int]:
    """Attention of ``query`` over a compressed layer (prefix + retrieved + recent entries).

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
    q_grouped = q.reshape(kv_heads, group * q_len, dim)  # rows (g, q) per KV head
    recent_k, recent_v = layer.recent()  # (1, Hkv, T, D)
    recent = _block(q_grouped, recent_k[0], recent_v[0], scaling)
    t_len = recent_k.shape[-2]
    if q_len > 1:  # query i sits at recent slot t_len - q_len + i; rows are ordered (g, q)
        query_slot = torch.arange(t_len - q_len, t_len, device=q.device).repeat(group)  # (R,)
        future = torch.arange(t_len, device=q.device)[None, :] > query_slot[:, None]
        recent.logits = recent.logits.masked_fill(future, float("-inf"))
    parts = [recent]
    keys, values = layer.prefix_keys, layer.prefix_values
    if layer.uniform:  # sorted by head: a free (Hkv, n, D) view
        parts.append(_block(q_grouped, keys.view(kv_heads, -1, dim), values.view(kv_heads, -1, dim), scaling))
    elif keys.shape[0]:
        tiled = layer.tile_heads.shape[0] * layer.tile_rows
        if tiled:
            parts.append(_block(q_grouped, keys[:tiled].view(-1, layer.tile_rows, dim),
                                values[:tiled].view(-1, layer.tile_rows, dim), scaling, layer.tile_heads))
        if keys.shape[0] > tiled:
            parts.append(_shared(q_grouped, keys[tiled:], values[tiled:], layer.prefix_heads[tiled:], scaling))
    if layer.retriever is not None:
        heads, r_keys, r_values, valid = layer.retriever.retrieved(q)
        if heads.numel() and r_keys.shape[1]:
            parts.append(_block(q_grouped, r_keys, r_values, scaling, heads, valid))
    out = merge(parts, kv_heads).to(query.dtype)  # (Hkv, R, D), rows (g, q)
    attended = sum(part.entries for part in parts)
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
