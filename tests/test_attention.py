"""attend_layer equals softmax attention over each head's kept entries, computed per head here."""

import pytest
import torch

from hybridkv.attention import attend_layer
from hybridkv.cache import CompressedLayer
from hybridkv.retrieval import ChunkRetriever

# 64: every head's entries are fewer than a tile (remainder only); 4: whole tiles + remainders
TILES = pytest.mark.parametrize("tile_rows", [64, 4])


def build_layer(kv_heads=3, prompt=40, dim=16, generated=5, seed=0, tile_rows=64):
    gen = torch.Generator().manual_seed(seed)
    layer = CompressedLayer(kv_heads, tile_rows)
    k = torch.randn(1, kv_heads, prompt, dim, generator=gen)
    v = torch.randn(1, kv_heads, prompt, dim, generator=gen)
    layer.update(k, v)
    keep = torch.rand(kv_heads, prompt, generator=gen) < torch.tensor([0.2, 0.6, 0.9])[:kv_heads, None]
    layer.compress(keep)
    new_k = torch.randn(1, kv_heads, generated, dim, generator=gen)
    new_v = torch.randn(1, kv_heads, generated, dim, generator=gen)
    for t in range(generated):
        layer.update(new_k[:, :, t : t + 1], new_v[:, :, t : t + 1])
    return layer, k, v, keep, new_k, new_v


def reference(query, k, v, keep, new_k, new_v, scaling):
    """Per query head: softmax over [kept prompt entries of its KV head] + generated tokens."""
    hq, q_len, dim = query.shape[1:]
    kv_heads = k.shape[1]
    group = hq // kv_heads
    out = torch.empty(1, q_len, hq, dim)
    for h in range(hq):
        kvh = h // group
        keys = torch.cat([k[0, kvh][keep[kvh]], new_k[0, kvh]])
        values = torch.cat([v[0, kvh][keep[kvh]], new_v[0, kvh]])
        for i in range(q_len):
            visible = keys.shape[0] - (q_len - 1 - i)  # causal among the newest q_len tokens
            w = torch.softmax(query[0, h, i] @ keys[:visible].T * scaling, dim=-1)
            out[0, i, h] = w @ values[:visible]
    return out


@TILES
def test_single_query_matches_reference(tile_rows):
    layer, k, v, keep, new_k, new_v = build_layer(tile_rows=tile_rows)
    query = torch.randn(1, 6, 1, 16)
    out, attended = attend_layer(layer, query, 0.25)
    ref = reference(query, k, v, keep, new_k, new_v, 0.25)
    assert torch.allclose(out, ref, atol=1e-5)
    assert attended == int(keep.sum()) + 3 * 5
    assert len(set(layer.head_lengths)) == 3  # genuinely different lengths per head
    tiles = [n // tile_rows for n in layer.head_lengths]
    assert layer.tile_heads.tolist() == [h for h, n in enumerate(tiles) for _ in range(n)]
    assert layer.prefix_keys.shape[0] == int(keep.sum())  # tiles are not padded


@TILES
def test_several_queries_are_causal_among_recent_tokens(tile_rows):
    layer, k, v, keep, new_k, new_v = build_layer(generated=4, tile_rows=tile_rows)
    query = torch.randn(1, 6, 3, 16)  # the newest 3 recent tokens' queries
    out, _ = attend_layer(layer, query, 0.25)
    assert torch.allclose(out, reference(query, k, v, keep, new_k, new_v, 0.25), atol=1e-5)


def test_head_with_nothing_kept_attends_to_recent_only():
    layer, k, v, keep, new_k, new_v = build_layer()
    empty = CompressedLayer(3)
    empty.update(k, v)
    keep[1] = False
    empty.compress(keep)
    for t in range(new_k.shape[2]):
        empty.update(new_k[:, :, t : t + 1], new_v[:, :, t : t + 1])
    query = torch.randn(1, 6, 1, 16)
    out, _ = attend_layer(empty, query, 0.25)
    assert torch.allclose(out, reference(query, k, v, keep, new_k, new_v, 0.25), atol=1e-5)


@TILES
def test_retrieved_chunks_of_heads_with_different_selections(tile_rows):
    """Two heads retrieve 1 and 3 chunks per step (a padded block with a validity mask): the
    result equals softmax attention over each head's kept tokens + its chosen chunks."""
    layer, k, v, keep, new_k, new_v = build_layer(prompt=40, generated=1, tile_rows=tile_rows)
    size, dim = 4, k.shape[-1]
    gen = torch.Generator().manual_seed(3)
    pool_k = torch.randn(6, size, dim, generator=gen)
    pool_v = torch.randn(6, size, dim, generator=gen)
    heads = torch.tensor([0, 0, 0, 2, 2, 2])
    layer.retriever = ChunkRetriever(pool_k, pool_v, heads, torch.arange(6) * size, torch.tensor([1, 0, 3]))
    query = torch.randn(1, 6, 1, dim, generator=gen)
    out, attended = attend_layer(layer, query, 0.25)
    chosen = layer.retriever.last_selected.tolist()
    assert sorted(int(heads[c]) for c in chosen) == [0, 2, 2, 2]
    expected = torch.empty(1, 1, 6, dim)
    for h in range(6):
        kvh = h // 2
        mine = [c for c in chosen if int(heads[c]) == kvh]
        keys = torch.cat([k[0, kvh][keep[kvh]], *[pool_k[c] for c in mine], new_k[0, kvh]])
        values = torch.cat([v[0, kvh][keep[kvh]], *[pool_v[c] for c in mine], new_v[0, kvh]])
        expected[0, 0, h] = torch.softmax(query[0, h, 0] @ keys.T * 0.25, -1) @ values
    assert torch.allclose(out, expected, atol=1e-5)
    assert attended == int(keep.sum()) + 3 + 4 * size
