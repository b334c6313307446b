"""HybridKV stage 3: static text-prior pruning, chunk retrieval, profile, memory, end to end."""

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import get_model, make_inputs
from test_memory import walked_bytes

from hybridkv import HeadProfile, HybridKV, ProfileMismatchError, profile_heads
from hybridkv.attention import attend_layer
from hybridkv.cache import CompressedLayer
from hybridkv.models.tiny import tiny_model, visual_inputs
from hybridkv.retrieval import ChunkRetriever


# ----------------------------------------------------------------- chunk retrieval
def test_retrieval_picks_the_chunk_of_the_best_key_and_the_top_bounds():
    gen = torch.Generator().manual_seed(0)
    chunks, size, dim, kv_heads, group = 12, 4, 8, 2, 2
    keys = torch.randn(chunks, size, dim, generator=gen) * 0.1
    heads = torch.tensor([0] * 6 + [1] * 6)
    q = torch.randn(kv_heads * group, 1, dim, generator=gen)
    keys[3, 2] = 5 * q[0, 0]  # head 0's best key, in chunk 3
    keys[9, 0] = 5 * q[3, 0]  # head 1's best key, in chunk 9
    retriever = ChunkRetriever(keys, keys.clone(), heads, torch.arange(chunks) * size, torch.tensor([2, 3]))
    chosen = retriever.select(q).tolist()
    for head, planted in ((0, 3), (1, 9)):  # brute force: the chunk holding the highest q.k of the head
        qh = q[head * group : (head + 1) * group, 0]  # (G, D)
        logits = torch.einsum("gd,mcd->gmc", qh, keys)
        logits[:, heads != head] = float("-inf")
        assert int(logits.amax(dim=(0, 2)).argmax()) == planted
        assert planted in chosen
    # and the selection equals the top chunks of the min/max bound computed chunk by chunk
    expected = []
    for head, count in ((0, 2), (1, 3)):
        bounds = {}
        for m in range(chunks):
            if heads[m] == head:
                qh = q[head * group : (head + 1) * group, 0]
                lo, hi = keys[m].min(0).values, keys[m].max(0).values
                bounds[m] = max(float(torch.maximum(qq * lo, qq * hi).sum()) for qq in qh)
        expected += sorted(bounds, key=bounds.get, reverse=True)[:count]
    assert sorted(chosen) == sorted(expected)


def test_dynamic_head_covering_the_prompt_is_exact():
    """Protected tokens + every chunk selected: attention equals full attention over the prompt."""
    gen = torch.Generator().manual_seed(1)
    kv_heads, length, dim, size = 2, 40, 8, 4
    k = torch.randn(1, kv_heads, length, dim, generator=gen)
    v = torch.randn(1, kv_heads, length, dim, generator=gen)
    layer = CompressedLayer(kv_heads)
    layer.update(k, v)
    protected = torch.zeros(kv_heads, length, dtype=torch.bool)
    protected[:, :4] = protected[:, -4:] = True
    protected[0] = True  # head 0 static, keeps all
    layer.compress(protected)
    positions = torch.arange(4, 36).view(8, size)  # head 1's chunks
    layer.retriever = ChunkRetriever(k[0, 1][positions], v[0, 1][positions], torch.ones(8, dtype=torch.long),
                                     positions[:, 0], torch.tensor([0, 8]))
    new_k, new_v = torch.randn(1, kv_heads, 1, dim, generator=gen), torch.randn(1, kv_heads, 1, dim, generator=gen)
    layer.update(new_k, new_v)
    q = torch.randn(1, 4, 1, dim, generator=gen)
    out, _ = attend_layer(layer, q, 0.3)
    full_k = torch.cat([k, new_k], dim=2).repeat_interleave(2, dim=1)
    full_v = torch.cat([v, new_v], dim=2).repeat_interleave(2, dim=1)
    ref = F.scaled_dot_product_attention(q, full_k, full_v, scale=0.3).transpose(1, 2)
    assert torch.allclose(out, ref, atol=1e-5)


# ----------------------------------------------------------------- static pruning
def test_static_heads_keep_the_top_text_prior_tokens():
    model = tiny_model("qwen2_5_vl", hidden_size=64, heads=4, kv_heads=2, seed=5)
    inputs = visual_inputs(images=2, grid=16, seed=6)
    method = HybridKV(0.25, max_dynamic_share=0.0, kernel_size=7, window=8, sink_tokens=4)
    with method.apply(model):
        model.generate(**inputs, max_new_tokens=2, do_sample=False)
    assert all(t == "static" for row in method.report.head_types for t in row)
    spans = method._engine.spans
    model.config.text_config._attn_implementation = "eager"
    try:
        attentions = model(**inputs, output_attentions=True).attentions
    finally:
        model.config.text_config._attn_implementation = "sdpa"
    length = spans.prompt_len
    positions = torch.arange(length)
    protected = (positions < 4) | ~spans.context | (positions >= length - 8)
    for idx, layer in enumerate(method._engine.cache.layers):
        prior = attentions[idx][0, :, spans.query_start :].mean(dim=1)  # (Hq, L)
        prior = prior.view(2, 2, length).mean(dim=1)
        scores = F.avg_pool1d(prior[:, None], 7, stride=1, padding=3)[:, 0]
        budgets = method.report.extra["memory_budgets"][idx]
        for h in range(2):
            n_free = budgets[h] - int(protected.sum())
            free_scores = scores[h].masked_fill(protected, float("-inf"))
            expected = set(free_scores.topk(n_free).indices.tolist()) | set(positions[protected].tolist())
            kept = set(layer.prefix_positions[layer.prefix_heads == h].tolist())
            assert kept == expected


# ----------------------------------------------------------------- profile
@pytest.fixture(scope="module")
def vl_profile():
    model = get_model("qwen2_5_vl")
    samples = [visual_inputs(images=2, grid=8, seed=s) for s in range(2)]
    return profile_heads(model, samples, decode_tokens=4, threshold=0.5, max_dynamic_share=0.5)


def test_profile_shapes_and_classification(vl_profile):
    model = get_model("qwen2_5_vl")
    assert len(vl_profile.staticness) == model.config.text_config.num_hidden_layers
    assert all(0.0 <= s <= 1.0 for row in vl_profile.staticness for s in row)
    assert all(i > 0.0 for row in vl_profile.importance for i in row)
    assert 0.0 < vl_profile.dynamic_share <= 0.5  # random heads are not static; the cap holds


def test_profile_round_trip_and_mismatch(vl_profile, tmp_path):
    path = tmp_path / "profile.json"
    vl_profile.save(path)
    loaded = HeadProfile.load(path)
    assert loaded == vl_profile
    loaded.check_model(get_model("qwen2_5_vl"))
    with pytest.raises(ProfileMismatchError, match="made for"):
        HybridKV(0.2, profile=loaded).apply(get_model("qwen2_vl"))
    with pytest.raises(ProfileMismatchError, match="made for"):
        loaded.check_model(tiny_model("qwen2_5_vl", layers=3))


def test_profile_malformed_files(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ProfileMismatchError, match="cannot read"):
        HeadProfile.load(bad)
    bad.write_text(json.dumps({"format": "something else"}))
    with pytest.raises(ProfileMismatchError, match="not a hybridkv head profile"):
        HeadProfile.load(bad)
    bad.write_text(json.dumps({"format": "hybridkv.head_profile/1", "identity": {"num_layers": 2, "num_kv_heads": 2},
                               "staticness": [[0.1]], "importance": [[1.0]], "head_types": [["x"]], "params": {}}))
    with pytest.raises(ProfileMismatchError, match="malformed"):
        HeadProfile.load(bad)


def test_offline_profile_drives_types_and_report(vl_profile):
    model = get_model("qwen2_5_vl")
    method = HybridKV(0.5, profile=vl_profile)
    with method.apply(model):
        model.generate(**make_inputs("multi_image"), max_new_tokens=4, do_sample=False)
    report = method.report
    assert report.profile_source == "offline"
    assert report.head_types == vl_profile.head_types
    online = HybridKV(0.5)
    with online.apply(model):
        model.generate(**make_inputs("multi_image"), max_new_tokens=4, do_sample=False)
    assert online.report.profile_source == "online"


# ----------------------------------------------------------------- end to end and memory
@pytest.mark.parametrize("model_type,kind", [("qwen2_5_vl", "image"), ("qwen2_5_vl", "multi_image"),
                                             ("qwen2_5_vl", "video"), ("llama", "text")])
def test_end_to_end_generate(model_type, kind):
    model = get_model(model_type)
    inputs = make_inputs(kind)
    method = HybridKV(0.4, chunk_size=4, window=4, max_dynamic_share=0.5, threshold=1.1)
    query = 8 if kind == "text" else None
    with method.apply(model, query_tokens=query):
        out = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    report = method.report
    assert out.shape[1] == inputs["input_ids"].shape[1] + 6
    types = [t for row in report.head_types for t in row]
    assert "dynamic" in types and "static" in types
    assert report.attended_tokens_per_step < report.prompt_tokens
    assert report.compression_ratio > 1.5
    assert method.report.to_dict()["extra"]["pool_chunks"]


def test_ten_percent_budget_holds_nine_times_less_in_all_tiers():
    model = tiny_model("qwen2_5_vl", hidden_size=256, heads=4, kv_heads=2, layers=2, seed=2)  # head_dim 64
    inputs = visual_inputs(images=4, grid=32, seed=3)  # 1024 visual tokens, 1050 in all
    ref = model.generate(**inputs, max_new_tokens=4, do_sample=False, return_dict_in_generate=True)
    full = sum(layer.keys.untyped_storage().nbytes() + layer.values.untyped_storage().nbytes()
               for layer in ref.past_key_values.layers)
    for store in ("device", "host"):
        method = HybridKV(0.1, store=store, threshold=1.1)
        with method.apply(model):
            model.generate(**inputs, max_new_tokens=4, do_sample=False)
        cache = method._engine.cache
        walked = walked_bytes(cache) + sum(walked_bytes_of(layer.retriever) for layer in cache.layers)
        report = method.report
        assert walked == report.resident_kv_bytes + report.offloaded_kv_bytes
        assert report.full_kv_bytes == full
        assert full / walked >= 9.0
        assert (report.offloaded_kv_bytes > 0) == (store == "host")


def walked_bytes_of(obj) -> int:
    if obj is None:
        return 0
    return sum(v.untyped_storage().nbytes() for v in vars(obj).values() if isinstance(v, torch.Tensor))


def test_retriever_refuses_to_select_more_chunks_than_a_head_holds():
    keys = torch.zeros(4, 2, 8)
    with pytest.raises(ValueError, match="cannot attend more chunks"):
        ChunkRetriever(keys, keys, torch.tensor([0, 0, 1, 1]), torch.arange(4) * 2, torch.tensor([2, 3]))
