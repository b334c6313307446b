"""Scores from query blocks equal scores from the whole attention matrix, and no block exceeds
its byte bound (a long question never materialises (Hq, question, prompt) probabilities)."""

import torch

from hybridkv.scoring import (
    attention_blocks,
    column_sums,
    key_diversity,
    mean_attention,
    snap_scores,
    top_mask,
    union_ranking,
)


def full_attention(queries, keys, scaling):
    """(Hkv, G, Lq, Lk) float64 causal attention written out: query i sits at key Lk - Lq + i."""
    hq, lq, dim = queries.shape
    kv, lk = keys.shape[:2]
    q = queries.reshape(kv, hq // kv, lq, dim).double()
    logits = torch.einsum("hgqd,hkd->hgqk", q, keys.double()) * scaling
    future = torch.arange(lk)[None, :] > (torch.arange(lq) + lk - lq)[:, None]
    return torch.softmax(logits.masked_fill(future, float("-inf")), dim=-1)


def inputs(seed=0, hq=6, kv=2, lq=37, lk=90, dim=8):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(hq, lq, dim, generator=gen), torch.randn(kv, lk, dim, generator=gen)


def test_blocks_cover_the_rows_within_their_bound():
    queries, keys = inputs()
    bound = 4 * 6 * 90 * 5  # five rows per block
    blocks = list(attention_blocks(queries, keys, 3, 0.3, block_bytes=bound))
    assert [first for first, _ in blocks] == list(range(3, 37, 5))
    assert all(probs.numel() * 4 <= bound for _, probs in blocks)
    whole = torch.cat([probs for _, probs in blocks], dim=2)
    assert torch.allclose(whole.double(), full_attention(queries, keys, 0.3)[:, :, 3:], atol=1e-6)


def test_mean_attention_and_column_sums_match_the_whole_matrix():
    queries, keys = inputs(seed=1)
    attn = full_attention(queries, keys, 0.3)
    assert torch.allclose(mean_attention(queries, keys, 20, 0.3).double(), attn[:, :, 20:].mean(dim=(1, 2)), atol=1e-6)
    assert torch.allclose(column_sums(queries, keys, 0.3).double(), attn.sum(dim=2).mean(dim=1), atol=1e-5)


def test_snap_scores_keep_the_window_first():
    queries, keys = inputs(seed=2, lq=90)
    scores = snap_scores(queries, keys, 8, 5, 0.3)
    assert torch.isinf(scores[:, -8:]).all() and torch.isfinite(scores[:, :-8]).all()


def cosine_to_window_mean(keys, width):
    """(Hkv, L) minus each key's cosine to the mean unit key of the ``width`` keys centred on it
    (the window shifted to stay inside the prompt), one position at a time in float64."""
    unit = keys.double() / keys.double().norm(dim=-1, keepdim=True)
    length = keys.shape[1]
    out = torch.empty(keys.shape[:2], dtype=torch.float64)
    for i in range(length):
        low = min(max(0, i - width // 2), max(0, length - width))
        mean = unit[:, low : low + width].mean(dim=1)
        out[:, i] = -(unit[:, i] * mean).sum(-1) / mean.norm(dim=-1)
    return out


def test_key_diversity_against_a_local_anchor_matches_a_per_position_reference():
    keys = inputs(seed=3)[1] + torch.linspace(0, 3, 90)[None, :, None]  # keys drift with position
    for width in (1, 8, 31, 89):
        assert torch.allclose(key_diversity(keys, width).double(), cosine_to_window_mean(keys, width), atol=1e-5)
    whole = cosine_to_window_mean(keys, 90)
    assert torch.allclose(key_diversity(keys).double(), whole, atol=1e-5)
    assert torch.allclose(key_diversity(keys, 500).double(), whole, atol=1e-5)
    assert not torch.allclose(key_diversity(keys, 8).double(), whole, atol=1e-2)


def test_union_ranking_keeps_the_best_of_both_rankings_in_their_shares():
    """Every top-k of the union holds first's best (1 - share) k and second's best share k
    (rounded down); with share 0.5 of two equal rankings it is that ranking."""
    gen = torch.Generator().manual_seed(4)
    first, second = torch.randn(3, 200, generator=gen), torch.randn(3, 200, generator=gen)
    for share in (0.25, 0.5, 0.8):
        union = union_ranking(first, second, share)
        for k in (1, 10, 57, 200):
            kept = top_mask(union, k)
            assert (kept.sum(-1) == k).all()
            need = top_mask(first, int((1 - share) * k)) | top_mask(second, int(share * k))
            assert (kept | ~need).all()
    assert torch.equal(union_ranking(first, first, 0.5).argsort(dim=-1, descending=True),
                       first.argsort(dim=-1, descending=True))
