"""Attention statistics used to score prompt tokens, computed from a few query rows only."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def query_attention(queries: torch.Tensor, keys: torch.Tensor, start: int, scaling: float) -> torch.Tensor:
    """Causal softmax attention of the prompt queries ``[start, L)`` over all prompt keys.

    Args:
        queries: (Hq, L, D) prompt queries after RoPE. keys: (Hkv, L, D) prompt keys after RoPE.
        start: first query row used. scaling: softmax scale.
    Returns:
        (Hkv, G, W, L) float32 attention probabilities, W = L - start, G = Hq / Hkv; row ``i``
        is zero beyond position ``start + i``.
    """
    hq, length, dim = queries.shape
    kv_heads = keys.shape[0]
    window = queries[:, start:].reshape(kv_heads, hq // kv_heads, length - start, dim).float()
    logits = torch.einsum("hgwd,hld->hgwl", window, keys.float()) * scaling
    future = torch.arange(length)[None, :] > torch.arange(start, length)[:, None]  # (W, L)
    return torch.softmax(logits.masked_fill(future.to(logits.device), float("-inf")), dim=-1)


def pool_scores(scores: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Average-pool scores (..., L) over ``kernel_size`` neighbours (odd, stride 1, same length)."""
    if kernel_size <= 1 or scores.shape[-1] == 0:
        return scores
    shape = scores.shape
    pooled = F.avg_pool1d(scores.reshape(-1, 1, shape[-1]), kernel_size, stride=1, padding=kernel_size // 2)
    return pooled.reshape(shape)


def snap_scores(queries: torch.Tensor, keys: torch.Tensor, window: int, kernel_size: int, scaling: float) -> torch.Tensor:
    """SnapKV scores: observation-window attention, mean over the window and the query heads of
    a group, average-pooled over neighbours (zero padding, as kvpress does) outside the window.

    Returns:
        (Hkv, L) float32 scores; the window's own positions get +inf (always kept first).
    """
    length = keys.shape[1]
    window = min(window, length)
    attn = query_attention(queries, keys, length - window, scaling)  # (Hkv, G, W, L)
    scores = pool_scores(attn.mean(dim=(1, 2))[:, : length - window], kernel_size)
    return torch.cat([scores, scores.new_full((scores.shape[0], window), float("inf"))], dim=1)


def top_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """(Hkv, L) bool mask of each row's ``k`` highest scores (ties broken by position)."""
    keep = torch.zeros_like(scores, dtype=torch.bool)
    keep.scatter_(1, scores.topk(min(k, scores.shape[1]), dim=1).indices, True)
    return keep
