"""Attention statistics used to score prompt tokens, computed from a few query rows at a time.

A text prior or an observation window can be thousands of query rows (a long question, a long
last turn). Its attention over a long prompt is never materialised whole: rows are processed in
blocks whose float32 probabilities take at most :data:`BLOCK_BYTES`, and only running sums are
kept, so the transient memory of scoring does not grow with the number of query rows.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F

BLOCK_BYTES = 64 * 2**20
"""Largest float32 block of attention probabilities scoring materialises at a time."""


def attention_blocks(queries: torch.Tensor, keys: torch.Tensor, start: int, scaling: float,
                     block_bytes: int = BLOCK_BYTES, causal_width: bool = False) -> Iterator[tuple[int, torch.Tensor]]:
    """Causal softmax attention of the query rows ``[start, L)`` over the keys, block by block.

    The queries are the last rows of the sequence whose keys are given (row ``i`` of
    ``queries`` sits at key position ``L_k - L_q + i``), so a row never sees later keys.

    Args:
        queries: (Hq, L_q, D) after RoPE. keys: (Hkv, L_k, D) after RoPE, L_k >= L_q.
        start: first query row used. scaling: softmax scale.
        block_bytes: bound on each block's (Hkv, G, rows, L_k) float32 probabilities.
        causal_width: give each block only the keys its rows can see (its last row's position + 1
            columns) instead of all L_k, about half the work over a whole causal matrix.
    Yields:
        (first row of the block, (Hkv, G, rows, W) float32 probabilities), W = L_k, or the block's
        causal width with ``causal_width``.
    """
    hq, q_len, dim = queries.shape
    kv_heads, k_len = keys.shape[0], keys.shape[1]
    group = hq // kv_heads
    rows = max(1, block_bytes // (4 * hq * max(1, k_len)))
    keys_f = keys.float()
    offset = k_len - q_len
    columns = torch.arange(k_len, device=keys.device)
    for first in range(start, q_len, rows):
        last = min(first + rows, q_len)
        width = last + offset if causal_width else k_len
        block = queries[:, first:last].reshape(kv_heads, group, last - first, dim).float()
        logits = torch.einsum("hgwd,hld->hgwl", block, keys_f[:, :width]).mul_(scaling)
        future = columns[None, :width] > (torch.arange(first, last, device=keys.device) + offset)[:, None]
        yield first, torch.softmax(logits.masked_fill_(future, float("-inf")), dim=-1)


def mean_attention(queries: torch.Tensor, keys: torch.Tensor, start: int, scaling: float) -> torch.Tensor:
    """(Hkv, L_k) float32 attention of the query rows ``[start, L_q)`` over the keys, mean over
    those rows and the query heads of each KV group."""
    total = torch.zeros(keys.shape[0], keys.shape[1], device=keys.device)
    for _, probs in attention_blocks(queries, keys, start, scaling):
        total += probs.sum(dim=(1, 2))
    group = queries.shape[0] // keys.shape[0]
    return total / max(1, (queries.shape[1] - start) * group)


def column_sums(queries: torch.Tensor, keys: torch.Tensor, scaling: float) -> torch.Tensor:
    """(Hkv, L_k) float32 attention every key receives from all query rows (causal column sums),
    mean over the query heads of each group."""
    total = torch.zeros(keys.shape[0], keys.shape[1], device=keys.device)
    for _, probs in attention_blocks(queries, keys, 0, scaling, causal_width=True):
        total[:, : probs.shape[-1]] += probs.sum(dim=2).mean(dim=1)
    return total


def pool_scores(scores: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Average-pool scores (..., L) over ``kernel_size`` neighbours (odd, stride 1, same length)."""
    if kernel_size <= 1 or scores.shape[-1] == 0:
        return scores
    shape = scores.shape
    pooled = F.avg_pool1d(scores.reshape(-1, 1, shape[-1]), kernel_size, stride=1, padding=kernel_size // 2)
    return pooled.reshape(shape)


def pool_by_modality(scores: torch.Tensor, visual: torch.Tensor, text_kernel: int, visual_kernel: int) -> torch.Tensor:
    """Average-pool scores (..., L) over ``visual_kernel`` neighbours at visual positions
    (``visual``: (L,) bool) and over ``text_kernel`` at the others; either window reads its
    neighbours whatever their modality."""
    pooled = pool_scores(scores, text_kernel)
    if visual_kernel == text_kernel or not bool(visual.any()):
        return pooled
    return torch.where(visual.to(scores.device), pool_scores(scores, visual_kernel), pooled)


def snap_scores(queries: torch.Tensor, keys: torch.Tensor, window: int, kernel_size: int, scaling: float) -> torch.Tensor:
    """SnapKV scores: observation-window attention, mean over the window and the query heads of
    a group, average-pooled over neighbours (zero padding, as kvpress does) outside the window.

    The window is the last ``window`` keys; its queries are the last ``window`` query rows.

    Returns:
        (Hkv, L_k) float32 scores; the window's own positions get +inf (always kept first).
    """
    length = keys.shape[1]
    window = min(window, length, queries.shape[1])
    mean = mean_attention(queries, keys, queries.shape[1] - window, scaling)
    scores = pool_scores(mean[:, : length - window], kernel_size)
    return torch.cat([scores, scores.new_full((scores.shape[0], window), float("inf"))], dim=1)


def key_diversity(keys: torch.Tensor, anchor_width: int | None = None) -> torch.Tensor:
    """(Hkv, L) float32 distinctiveness of each key: minus its cosine similarity to an anchor,
    the mean unit key of the head (KeyDiff, Park et al., 2025). Keys that repeat the prompt's
    common pattern (background patches, filler) score low; rare content scores high. Needs no
    query.

    ``anchor_width=None`` anchors every key to the whole prompt's mean, as KeyDiff does. After
    RoPE that mean leans toward the phases of no particular position, so keys in the middle of a
    long prompt look more like it than keys at its ends whatever their content; an int anchors
    each key to the mean of the ``anchor_width`` keys centred on it (shifted inward at the
    prompt's edges), which compares a key only with its neighbourhood's phases.

    Args:
        keys: (Hkv, L, D) after RoPE.
        anchor_width: keys per local anchor (>= 1), or None for one anchor per head.
    """
    unit = F.normalize(keys.float(), dim=-1)
    length = unit.shape[1]
    if anchor_width is None or anchor_width >= length:
        anchor = unit.mean(dim=1, keepdim=True)  # (Hkv, 1, D)
    else:
        sums = F.pad(unit.double().cumsum(dim=1), (0, 0, 1, 0))  # (Hkv, L + 1, D) prefix sums
        low = (torch.arange(length, device=unit.device) - anchor_width // 2).clamp(0, length - anchor_width)
        anchor = (sums[:, low + anchor_width] - sums[:, low]).float()  # (Hkv, L, D) window sums
    return -(unit * F.normalize(anchor, dim=-1)).sum(-1)


def union_ranking(first: torch.Tensor, second: torch.Tensor, share: float) -> torch.Tensor:
    """(H, L) scores whose ``k`` best are, for every ``k``, the union of ``first``'s best
    ``(1 - share)`` share and ``second``'s best ``share`` share of a ``t >= k`` (each row's top
    ``k`` under :func:`top_mask` holds at least ``(1 - share) k`` of ``first``'s top and
    ``share k`` of ``second``'s, rounded down).

    Args:
        first / second: (H, L) scores, higher is better.
        share: in (0, 1), the weight of ``second``.
    """
    return -torch.minimum(ranks(first) / (1.0 - share), ranks(second) / share)


def ranks(scores: torch.Tensor) -> torch.Tensor:
    """(..., L) float place of each score in its row, 0 for the highest (ties broken by position)."""
    order = scores.argsort(dim=-1, descending=True, stable=True)
    places = torch.empty_like(order)
    places.scatter_(-1, order, torch.arange(scores.shape[-1], device=scores.device).expand_as(order))
    return places.float()


def top_mask(scores: torch.Tensor, k: int | torch.Tensor) -> torch.Tensor:
    """(Hkv, L) bool mask of each row's ``k`` highest scores (ties broken by position).

    ``k`` is one count for every row, or (Hkv,) counts per row.
    """
    keep = torch.zeros_like(scores, dtype=torch.bool)
    if isinstance(k, int):
        keep.scatter_(1, scores.topk(min(k, scores.shape[1]), dim=1).indices, True)
        return keep
    order = scores.argsort(dim=1, descending=True, stable=True)
    rank = torch.arange(scores.shape[1], device=scores.device)[None, :] < k.to(scores.device)[:, None]
    return keep.scatter_(1, order, rank)
