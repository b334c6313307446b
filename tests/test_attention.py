"""The decoding step equals softmax attention over each row's kept (and retrieved) entries,
computed per sequence and head here; it compiles, and it never synchronises with the host."""

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from hybridkv.attention import decode_step, segment_attention
from hybridkv.cache import ChunkPool, CompressedLayer, ForwardBias, HeadChunks


def append(layer, keys, values):
    """Feed new tokens (B, H, Q, D) to a layer as a forward would."""
    layer.forward_bias.set(None, keys.shape[0], keys.shape[2], keys.dtype, keys.device)
    layer.update(keys, values)


def build(batch=2, kv_heads=3, prompt=40, dim=16, generated=5, chunks=True, dtype=torch.float32, seed=0, in_row=False):
    """A compacted layer whose rows keep different numbers of entries; with ``chunks``, heads 0
    and 1 of every sequence retrieve 1 and 3 of their chunks per step. Returns the layer, the
    prompt and generated K/V, the keep mask and the pools. ``in_row``: the pools live in their
    rows (picked chunks opened in the bias) instead of their own storage (copied to slots)."""
    gen = torch.Generator().manual_seed(seed)
    layer = CompressedLayer(kv_heads, ForwardBias())
    k = torch.randn(batch, kv_heads, prompt, dim, generator=gen).to(dtype)
    v = torch.randn(batch, kv_heads, prompt, dim, generator=gen).to(dtype)
    append(layer, k, v)
    share = torch.tensor([0.2, 0.5, 0.9])[:kv_heads, None]
    keep = torch.rand(batch, kv_heads, prompt, generator=gen) < share
    pools = []
    if chunks:
        size = 4
        for b in range(batch):
            row = []
            for head, select in ((0, 1), (1, 3)):
                free = (~keep[b, head]).nonzero().flatten()[: 4 * size].view(4, size)  # 4 chunks of evicted tokens
                row.append(HeadChunks(head, k[b, head][free], v[b, head][free], free.to(torch.int32), select))
            pools.append(row)
    slots = pooled = None
    if pools:
        slots = torch.zeros(batch, kv_heads, dtype=torch.long)
        slots[:, 0], slots[:, 1] = 1 * 4, 3 * 4
        if in_row:
            pooled, slots = torch.where(slots > 0, 4 * 4, 0), None
    start = layer.compact(keep, slots, pooled)
    if pools:
        buffers = (layer.keys, layer.values) if in_row else None
        layer.retriever = ChunkPool(pools, kv_heads, start, layer.kept_width - 1, layer=buffers)
    new_k = torch.randn(batch, kv_heads, generated, dim, generator=gen).to(dtype)
    new_v = torch.randn(batch, kv_heads, generated, dim, generator=gen).to(dtype)
    for t in range(generated):
        append(layer, new_k[:, :, t : t + 1], new_v[:, :, t : t + 1])
    return layer, k, v, keep, new_k, new_v, pools


def reference(query, k, v, keep, new_k, new_v, scaling, picked=None):
    """Per sequence and query head: float64 softmax over [kept prompt entries + picked chunks +
    generated tokens], causal among the newest Q generated tokens. picked: {(b, h): [(keys, values)]}."""
    batch, hq, q_len, dim = query.shape
    kv_heads = k.shape[1]
    group = hq // kv_heads
    out = torch.empty(batch, q_len, hq, dim, dtype=torch.float64)
    for b in range(batch):
        for h in range(hq):
            kvh = h // group
            extra = (picked or {}).get((b, kvh), [])
            keys = torch.cat([k[b, kvh][keep[b, kvh]], *[c[0] for c in extra], new_k[b, kvh]]).double()
            values = torch.cat([v[b, kvh][keep[b, kvh]], *[c[1] for c in extra], new_v[b, kvh]]).double()
            for i in range(q_len):
                visible = keys.shape[0] - (q_len - 1 - i)
                w = torch.softmax(query[b, h, i].double() @ keys[:visible].T * scaling, dim=-1)
                out[b, i, h] = w @ values[:visible]
    return out


def picked_chunks(layer, pools, query, group):
    """The chunks each retrieving row should pick, by the min/max bound computed chunk by chunk."""
    picked = {}
    for b, row in enumerate(pools):
        for item in row:
            qh = query[b, item.head * group : (item.head + 1) * group, -1].double()  # (G, D)
            bounds = [float(torch.maximum(qh * c.double().amin(0), qh * c.double().amax(0)).sum(-1).max())
                      for c in item.keys]
            best = sorted(range(len(bounds)), key=bounds.__getitem__, reverse=True)[: item.select]
            picked[(b, item.head)] = [(item.keys[m], item.values[m]) for m in best]
    return picked


@pytest.mark.parametrize("chunks,in_row", [(False, False), (True, False), (True, True)],
                         ids=["kept-only", "retrieval-slots", "retrieval-in-row"])
def test_decode_step_matches_reference(chunks, in_row):
    layer, k, v, keep, new_k, new_v, pools = build(chunks=chunks, in_row=in_row)
    query = torch.randn(2, 6, 1, 16, generator=torch.Generator().manual_seed(9))
    pool = layer.retriever.step(layer.keys.shape[2]) if chunks else None
    out, picked = decode_step(query, layer.keys, layer.values, layer.bias, 0.25, pool, layer.stored)
    expected = reference(query, k, v, keep, new_k, new_v, 0.25, picked_chunks(layer, pools, query, 2))
    assert torch.allclose(out.double(), expected, atol=1e-5)
    assert len({int(n) for n in keep.sum(-1).flatten()}) > 2  # rows genuinely keep different numbers
    if chunks:
        assert picked.shape == (2 * 2, 3)  # (sequences x retrieving heads, the largest selection)


def test_whole_buffer_with_bias_equals_the_stored_columns():
    """The compiled step attends the whole buffer: unwritten columns must weigh nothing."""
    layer, *_ = build(chunks=False)
    assert layer.keys.shape[2] > layer.stored
    query = torch.randn(2, 6, 1, 16)
    stored, _ = decode_step(query, layer.keys, layer.values, layer.bias, 0.25, None, layer.stored)
    whole, _ = decode_step(query, layer.keys, layer.values, layer.bias, 0.25, None, None)
    assert torch.allclose(stored, whole, atol=1e-6)


@pytest.mark.parametrize("in_row", [False, True], ids=["slots", "in-row"])
def test_several_queries_are_causal_among_new_tokens(in_row):
    layer, k, v, keep, new_k, new_v, pools = build(chunks=True, generated=4, in_row=in_row)
    query = torch.randn(2, 6, 3, 16, generator=torch.Generator().manual_seed(4))  # the newest 3 tokens' queries
    out = segment_attention(query, layer.keys, layer.values, layer.bias, layer.stored, 0.25, layer.retriever)
    # one retrieval for the forward: the bound is the max over every query row of the group
    picked = {}
    for b, row in enumerate(pools):
        for item in row:
            qh = query[b, item.head * 2 : (item.head + 1) * 2].reshape(-1, 16).double()
            bounds = [float(torch.maximum(qh * c.double().amin(0), qh * c.double().amax(0)).sum(-1).max())
                      for c in item.keys]
            best = sorted(range(len(bounds)), key=bounds.__getitem__, reverse=True)[: item.select]
            picked[(b, item.head)] = [(item.keys[m], item.values[m]) for m in best]
    assert torch.allclose(out.double(), reference(query, k, v, keep, new_k, new_v, 0.25, picked), atol=1e-5)


def test_bfloat16_step_matches_a_float64_reference():
    """Keys and values in bf16; logits and softmax accumulate in fp32 inside SDPA."""
    layer, k, v, keep, new_k, new_v, pools = build(chunks=True, dtype=torch.bfloat16, in_row=True)
    query = torch.randn(2, 6, 1, 16, generator=torch.Generator().manual_seed(5)).to(torch.bfloat16)
    pool = layer.retriever.step(layer.keys.shape[2])
    out, _ = decode_step(query, layer.keys, layer.values, layer.bias, 0.25, pool, layer.stored)
    assert out.dtype == torch.bfloat16
    expected = reference(query, k, v, keep, new_k, new_v, 0.25, picked_chunks(layer, pools, query, 2))
    assert (out.double() - expected).abs().max() < 2e-2


@pytest.mark.parametrize("in_row", [False, True], ids=["slots", "in-row"])
def test_compiled_step_equals_eager_step(in_row):
    layer, *_ = build(chunks=True, in_row=in_row)
    query = torch.randn(2, 6, 1, 16)
    pool = layer.retriever.step(layer.keys.shape[2])
    keys, values, bias = layer.keys.clone(), layer.values.clone(), layer.bias.clone()
    eager, eager_picks = decode_step(query, keys, values, bias, 0.25, pool, None)
    compiled = torch.compile(decode_step, fullgraph=True, dynamic=True)
    out, picks = compiled(query, layer.keys, layer.values, layer.bias, 0.25, pool, None)
    assert torch.equal(picks, eager_picks)
    assert torch.allclose(out, eager, atol=1e-6)
    assert torch.equal(layer.keys, keys) and torch.equal(layer.bias, bias)  # same slots written / chunks opened


def test_decode_step_does_not_synchronise():
    layer, *_ = build(chunks=True, in_row=True)
    query = torch.randn(2, 6, 1, 16)
    pool = layer.retriever.step(layer.keys.shape[2])
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        decode_step(query, layer.keys, layer.values, layer.bias, 0.25, pool, layer.stored)
    names = [e.key for e in prof.key_averages()]
    assert "aten::topk" in names and "aten::scaled_dot_product_attention" in names  # it did retrieve and attend
    assert not {"aten::item", "aten::_local_scalar_dense"} & set(names)
