"""HybridKV stage 3: static text-prior pruning, chunk retrieval, profile, memory, end to end."""

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import get_model, kept_positions, make_inputs, run_under
from test_rope import keys_before_rope

from hybridkv import HeadProfile, HybridKV, ProfileMismatchError, profile_heads
from hybridkv.attention import decode_step
from hybridkv.cache import ChunkPool, CompressedLayer, ForwardBias, HeadChunks
from hybridkv.cache.chunk_pool import pick
from hybridkv.models.tiny import text_inputs, tiny_model, visual_inputs
from hybridkv.scoring import pool_by_modality, pool_scores


# ----------------------------------------------------------------- chunk retrieval
def pool_of(keys, heads, selects, kv_heads):
    """A one-sequence ChunkPool over chunks (M, C, D) owned by ``heads`` (M,), slots from column 0."""
    rows = [[HeadChunks(h, keys[heads == h], keys[heads == h].clone(), torch.zeros(int((heads == h).sum()), keys.shape[1],
                                                                                   dtype=torch.int32), selects[h])
             for h in range(kv_heads) if selects[h] or (heads == h).any()]]
    return ChunkPool(rows, kv_heads, torch.zeros(1, kv_heads, dtype=torch.long), trash=0)


def test_retrieval_picks_the_chunk_of_the_best_key_and_the_top_bounds():
    gen = torch.Generator().manual_seed(0)
    chunks, size, dim, kv_heads, group = 12, 4, 8, 2, 2
    keys = torch.randn(chunks, size, dim, generator=gen) * 0.1
    heads = torch.tensor([0] * 6 + [1] * 6)
    q = torch.randn(kv_heads * group, dim, generator=gen)
    keys[3, 2] = 5 * q[0]  # head 0's best key, in chunk 3
    keys[9, 0] = 5 * q[3]  # head 1's best key, in chunk 9
    pool = pool_of(keys, heads, [2, 3], kv_heads)
    picks = pick(q.view(1, kv_heads, group, dim), pool.step(16))  # each head's chunks, best first
    assert picks.shape == (2, 3)  # S = the largest selection for every head; head 0's third pick is unused
    chosen = set(picks[0, :2].tolist()) | {6 + int(m) for m in picks[1]}  # head 1's chunks are 6-11
    for planted in (3, 9):  # brute force: the chunk holding the highest q.k of the head
        assert planted in chosen
    expected = set()
    for head, count in ((0, 2), (1, 3)):
        bounds = {}
        for m in range(chunks):
            if heads[m] == head:
                qh = q[head * group : (head + 1) * group]
                lo, hi = keys[m].min(0).values, keys[m].max(0).values
                bounds[m] = max(float(torch.maximum(qq * lo, qq * hi).sum()) for qq in qh)
        expected |= set(sorted(bounds, key=bounds.get, reverse=True)[:count])
    assert chosen == expected


def test_dynamic_head_covering_the_prompt_is_exact():
    """Protected tokens + every chunk selected: attention equals full attention over the prompt."""
    gen = torch.Generator().manual_seed(1)
    kv_heads, length, dim, size = 2, 40, 8, 4
    k = torch.randn(1, kv_heads, length, dim, generator=gen)
    v = torch.randn(1, kv_heads, length, dim, generator=gen)
    layer = CompressedLayer(kv_heads, ForwardBias())
    layer.forward_bias.set(None, 1, length, k.dtype, k.device)
    layer.update(k, v)
    keep = torch.zeros(1, kv_heads, length, dtype=torch.bool)
    keep[:, :, :4] = keep[:, :, -4:] = True
    keep[0, 0] = True  # head 0 static, keeps all
    positions = torch.arange(4, 36).view(8, size)  # head 1's chunks
    slots = torch.tensor([[0, 8 * size]])
    start = layer.compact(keep, slots)
    item = HeadChunks(1, k[0, 1][positions], v[0, 1][positions], positions.to(torch.int32), 8)
    layer.retriever = ChunkPool([[item]], kv_heads, start, layer.kept_width - 1)
    new_k, new_v = torch.randn(1, kv_heads, 1, dim, generator=gen), torch.randn(1, kv_heads, 1, dim, generator=gen)
    layer.forward_bias.set(None, 1, 1, k.dtype, k.device)
    layer.update(new_k, new_v)
    q = torch.randn(1, 4, 1, dim, generator=gen)
    out, _ = decode_step(q, layer.keys, layer.values, layer.bias, 0.3, layer.retriever.step(layer.keys.shape[2]),
                         layer.stored)
    full_k = torch.cat([k, new_k], dim=2).repeat_interleave(2, dim=1)
    full_v = torch.cat([v, new_v], dim=2).repeat_interleave(2, dim=1)
    ref = F.scaled_dot_product_attention(q, full_k, full_v, scale=0.3).transpose(1, 2)
    assert torch.allclose(out, ref, atol=1e-5)


# ----------------------------------------------------------------- static pruning
def test_static_heads_keep_the_top_text_prior_tokens():
    model = tiny_model("qwen2_5_vl", hidden_size=64, heads=4, kv_heads=2, seed=5)
    inputs = visual_inputs(images=2, grid=16, seed=6)
    method = HybridKV(0.25, max_dynamic_share=0.0, kernel_size=7, window=8, sink_tokens=4)
    with method.apply(model) as engine:
        model.generate(**inputs, max_new_tokens=2, do_sample=False)
        kept = kept_positions(engine.layers)
        spans = engine._history[0][0].spans
    assert all(t == "static" for row in method.report.head_types for t in row)
    model.config.text_config._attn_implementation = "eager"
    try:
        attentions = model(**inputs, output_attentions=True).attentions
    finally:
        model.config.text_config._attn_implementation = "sdpa"
    length = spans.prompt_len
    positions = torch.arange(length)
    protected = (positions < 4) | ~spans.context | (positions >= length - 8)
    for idx in range(len(kept)):
        prior = attentions[idx][0, :, spans.query_start :].mean(dim=1)  # (Hq, L)
        prior = prior.view(2, 2, length).mean(dim=1)
        scores = F.avg_pool1d(prior[:, None], 7, stride=1, padding=3)[:, 0]
        budgets = method.report.extra["memory_budgets"][idx]
        for h in range(2):
            n_free = budgets[h] - int(protected.sum())
            free_scores = scores[h].masked_fill(protected, float("-inf"))
            expected = set(free_scores.topk(n_free).indices.tolist()) | set(positions[protected].tolist())
            assert set(kept[idx][0][h]) == expected


def test_static_heads_of_a_text_prompt_pool_the_text_prior_over_kernel_size():
    """A text prompt (question = last 8 tokens): its context is text, so scores are pooled over
    ``kernel_size`` (15), and ``visual_kernel_size`` plays no part."""
    model = get_model("llama")
    inputs = make_inputs("text")
    method = HybridKV(0.3, max_dynamic_share=0.0, window=8, sink_tokens=4, visual_kernel_size=3)
    with method.apply(model, query_tokens=8) as engine:
        model.generate(**inputs, max_new_tokens=2, do_sample=False)
        kept = kept_positions(engine.layers)
        spans = engine._history[0][0].spans
    assert method.kernel_size == 15 and not bool(spans.visual.any())
    model.config._attn_implementation = "eager"
    try:
        attentions = model(**inputs, output_attentions=True).attentions
    finally:
        model.config._attn_implementation = "sdpa"
    length = spans.prompt_len
    positions = torch.arange(length)
    protected = (positions < 4) | ~spans.context | (positions >= length - 8)
    heads, kv_heads = attentions[0].shape[1], model.config.num_key_value_heads
    for idx in range(len(kept)):
        prior = attentions[idx][0, :, spans.query_start :].mean(dim=1).view(kv_heads, heads // kv_heads, length).mean(1)
        scores = torch.stack([torch.stack([prior[h, max(0, i - 7) : i + 8].sum() / 15 for i in range(length)])
                              for h in range(kv_heads)])  # centred 15-wide mean, zeros outside
        for h in range(kv_heads):
            n_free = method.report.extra["memory_budgets"][idx][h] - int(protected.sum())
            expected = set(scores[h].masked_fill(protected, float("-inf")).topk(n_free).indices.tolist())
            assert set(kept[idx][0][h]) == expected | set(positions[protected].tolist())


def test_pool_by_modality_uses_each_positions_own_width():
    """Visual positions average ``visual_kernel`` neighbours, text positions ``text_kernel``
    (zeros beyond the ends), against a loop over positions."""
    scores = torch.rand(2, 40, generator=torch.Generator().manual_seed(0))
    visual = torch.zeros(40, dtype=torch.bool)
    visual[10:30] = True
    pooled = pool_by_modality(scores, visual, 15, 3)
    for i in range(40):
        half = 1 if visual[i] else 7
        expected = scores[:, max(0, i - half) : i + half + 1].sum(-1) / (2 * half + 1)
        assert torch.allclose(pooled[:, i], expected)
    assert torch.equal(pool_by_modality(scores, torch.zeros(40, dtype=torch.bool), 15, 3), pool_scores(scores, 15))


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
    inputs = {"image": lambda: visual_inputs(images=1, grid=24), "multi_image": lambda: visual_inputs(images=3, grid=16),
              "video": lambda: visual_inputs(images=0, video_frames=4, grid=16), "text": lambda: make_inputs("text")}[kind]()
    method = HybridKV(0.4, chunk_size=4, window=4, max_dynamic_share=0.5, threshold=1.1)
    query = 8 if kind == "text" else None
    out, report, _, _ = run_under(model, method, inputs, query_tokens=query, max_new_tokens=6)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 6
    types = [t for row in report.head_types for t in row]
    assert "dynamic" in types and "static" in types
    assert report.attended_tokens_per_step < report.prompt_tokens
    assert report.compression_ratio > 1.5
    assert sum(map(sum, report.extra["pool_chunks"])) > 0  # dynamic heads hold chunk pools


def test_ten_percent_budget_holds_nine_times_less_in_all_tiers():
    model = tiny_model("qwen2_5_vl", hidden_size=256, heads=4, kv_heads=2, layers=2, seed=2)  # head_dim 64
    inputs = visual_inputs(images=8, grid=32, seed=3)  # 2048 visual tokens, 2082 in all
    ref = model.generate(**inputs, max_new_tokens=4, do_sample=False, return_dict_in_generate=True)
    full = sum(layer.keys.untyped_storage().nbytes() + layer.values.untyped_storage().nbytes()
               for layer in ref.past_key_values.layers)
    reports = {}
    for store in ("device", "host"):
        _, report, _, walked = run_under(model, HybridKV(0.1, store=store, threshold=1.1), inputs, max_new_tokens=4)
        assert walked == report.resident_kv_bytes + report.offloaded_kv_bytes
        assert report.full_kv_bytes == full
        assert (report.offloaded_kv_bytes > 0) == (store == "host")
        assert "dynamic" in [t for row in report.head_types for t in row]
        reports[store] = report
    # the device store keeps the dynamic heads' pools in their rows' unused columns
    device = reports["device"]
    assert full / (device.resident_kv_bytes + device.offloaded_kv_bytes) >= 9.0
    # the host store moves the pools off the device: less resident, more in all (the rows stay as wide)
    assert reports["host"].resident_kv_bytes <= device.resident_kv_bytes


def test_a_head_cannot_select_more_chunks_than_it_holds():
    keys = torch.zeros(2, 2, 8)
    with pytest.raises(ValueError, match="cannot attend more chunks"):
        HeadChunks(0, keys, keys, torch.zeros(2, 2, dtype=torch.int32), 3)


# ----------------------------------------------------------------- any budget works
def test_budget_below_the_protected_tokens_keeps_what_it_must_and_says_so():
    """HybridKV(0.1) on a 30-token prompt: every head keeps its sinks, question and window (the
    budget is exceeded, and the report says by how much); generation runs."""
    model = get_model("llama")
    inputs = text_inputs(30, seed=3)
    out, report, kept, _ = run_under(model, HybridKV(0.1, window=4), inputs, query_tokens=8, max_new_tokens=4)
    assert out.shape[1] == 34
    must = list(range(4)) + list(range(22, 30))  # sinks, then the question (which holds the window)
    assert all(head == must for layer in kept for head in layer[0])
    assert report.budget_exceeded_tokens == sum(len(must) - 3 for _ in range(2) for _ in range(2))
    assert report.extra["degraded_layers"] == 2


def test_budget_between_must_and_all_text_prunes_the_other_text_by_score():
    """A vision prompt whose text does not fit the budget: sinks, question and window are kept,
    the other text and the visual tokens compete by score within the budget."""
    model = get_model("qwen2_5_vl")
    inputs = visual_inputs(images=3, grid=8, seed=1, text_before=30, question=6)
    length = inputs["input_ids"].shape[1]
    budget = 30
    _, report, kept, _ = run_under(model, HybridKV(budget, window=4, max_dynamic_share=0.0), inputs, max_new_tokens=2)
    assert report.budget_exceeded_tokens == 0
    assert all(len(head) == budget for layer in kept for head in layer[0])
    assert all(set(range(4)) | set(range(length - 6, length)) <= set(head) for layer in kept for head in layer[0])


@pytest.mark.parametrize("anchor,share", [(None, 0.0), (24, 0.0), (None, 1.0), (None, 0.5)])
def test_a_prompt_without_question_scores_tokens_by_key_diversity(anchor, share):
    """Images compressed before the question: no text prior, so static heads keep their
    protected tokens and the keys least like their head's mean key, of the whole prompt or of
    the ``diversity_anchor`` keys around each (pooled over ``diversity_kernel``, not the text
    prior's ``kernel_size``): ranked on the cached keys, on the keys before RoPE (read here from
    the key projections) or, with ``derotate_share`` 0.5, at least the best half of each (each
    head's own ranking alone: ``consensus_share=0.0``)."""
    model = tiny_model("qwen2_5_vl", hidden_size=64, heads=4, kv_heads=2, seed=5)
    inputs = visual_inputs(images=2, grid=16, question=0, seed=6)  # ends with <vision_end>
    method = HybridKV(0.5, max_dynamic_share=0.0, kernel_size=7, diversity_kernel=5, window=8, sink_tokens=4,
                      diversity_anchor=anchor, derotate_share=share, consensus_share=0.0)
    with method.apply(model) as engine:
        model.generate(**inputs, max_new_tokens=2, do_sample=False)
        kept = kept_positions(engine.layers)
        spans = engine._history[0][0].spans
    assert spans.query_source == "none" and method.report.extra["token_prior"] == "key_diversity"
    assert method.report.extra["degraded_layers"] == 0
    with torch.no_grad():
        before = keys_before_rope(model, lambda: model(**inputs, use_cache=True)) if share else None
        cache = model(**inputs, use_cache=True).past_key_values
    length = spans.prompt_len
    positions = torch.arange(length)
    protected = (positions < 4) | ~spans.context | (positions >= length - 8)  # no question span to keep
    for idx in range(len(kept)):
        rankings = ([cache.layers[idx].keys[0].float()] if share < 1 else []) + ([before[idx][0]] if share else [])
        for h in range(2):
            n_free = method.report.extra["memory_budgets"][idx][h] - int(protected.sum())
            tops = []
            for keys in rankings:  # (Hkv, L, D) each
                unit = keys[h] / keys[h].norm(dim=-1, keepdim=True)
                width = length if anchor is None else anchor
                lows = [min(max(0, i - width // 2), length - width) for i in range(length)]
                means = torch.stack([unit[low : low + width].mean(dim=0) for low in lows])  # (L, D)
                diversity = -(unit * means).sum(-1) / means.norm(dim=-1)
                scores = F.avg_pool1d(diversity[None, None], 5, stride=1, padding=2)[0, 0].masked_fill(
                    protected, float("-inf"))
                tops.append(set(scores.topk(n_free // len(rankings)).indices.tolist()))
            heads = set(kept[idx][0][h])
            assert len(heads) == n_free + int(protected.sum()) and set(positions[protected].tolist()) <= heads
            assert set().union(*tops) <= heads


def test_a_prompt_without_question_keeps_the_deep_layers_model_wide_ranking():
    """With ``consensus_share`` 0.5 every head keeps at least the best half of its free budget by
    the model-wide ranking (each token's mean place, over the KV heads of the deeper half of the
    layers, in those heads' own rankings) and a quarter by each of its own two key-diversity
    rankings (after RoPE, and before it: read from the key projections). Places and the union are
    recomputed here from the definitions."""
    model = tiny_model("qwen2_5_vl", hidden_size=64, layers=4, heads=4, kv_heads=2, seed=5)
    inputs = visual_inputs(images=2, grid=16, question=0, seed=6)
    method = HybridKV(0.4, max_dynamic_share=0.0, diversity_kernel=5, window=8, sink_tokens=4)
    with method.apply(model) as engine:
        model.generate(**inputs, max_new_tokens=2, do_sample=False)
        kept = kept_positions(engine.layers)
        spans = engine._history[0][0].spans
    with torch.no_grad():
        before = keys_before_rope(model, lambda: model(**inputs, use_cache=True))
        cache = model(**inputs, use_cache=True).past_key_values
    length = spans.prompt_len
    positions = torch.arange(length)
    protected = (positions < 4) | ~spans.context | (positions >= length - 8)

    def places(scores):  # (L,) -> place of each token, 0 = best, ties by position
        order = sorted(range(length), key=lambda i: (-float(scores[i]), i))
        out = torch.empty(length)
        out[torch.tensor(order)] = torch.arange(length, dtype=torch.float)
        return out

    def diversity(keys):  # (L, D) -> (L,) pooled dissimilarity to the mean unit key
        unit = keys / keys.norm(dim=-1, keepdim=True)
        mean = unit.mean(dim=0)
        return F.avg_pool1d(-(unit @ mean / mean.norm())[None, None], 5, stride=1, padding=2)[0, 0]

    own = {}
    for idx in range(4):
        for h in range(2):
            cached, derotated = places(diversity(cache.layers[idx].keys[0, h].float())), places(diversity(before[idx][0, h]))
            own[idx, h] = (cached, derotated, torch.minimum(cached / 0.5, derotated / 0.5))  # lower is better
    consensus = torch.stack([places(-own[idx, h][2]) for idx in (2, 3) for h in range(2)]).mean(dim=0)
    for idx in range(4):
        for h in range(2):
            n_free = method.report.extra["memory_budgets"][idx][h] - int(protected.sum())
            heads = set(kept[idx][0][h])
            assert len(heads) == n_free + int(protected.sum()) and set(positions[protected].tolist()) <= heads
            assert set(consensus.argsort(stable=True)[: n_free // 2].tolist()) <= heads
            for ranking in own[idx, h][:2]:
                assert set(ranking.argsort(stable=True)[: n_free // 2 // 2].tolist()) <= heads
    assert method.consensus_share == 0.5 and method.consensus_from == 0.5  # the defaults checked here


def test_the_model_wide_ranking_changes_what_a_middle_layer_keeps():
    """The ranking above is not a no-op: without it (``consensus_share=0.0``) some head keeps
    other tokens."""
    model = tiny_model("qwen2_5_vl", hidden_size=64, layers=4, heads=4, kv_heads=2, seed=5)
    inputs = visual_inputs(images=2, grid=16, question=0, seed=6)
    runs = [run_under(model, HybridKV(0.4, max_dynamic_share=0.0, consensus_share=share), inputs)[2]
            for share in (0.0, 0.5)]
    assert runs[0] != runs[1]


def test_a_prompt_without_question_at_a_small_budget_keeps_only_sinks_and_window_for_sure():
    """A one-image prompt that ends with its image, at a budget below the text: what every head
    must keep is its sinks and window (no question span), so the trailing visual tokens compete
    by score and the budget is exceeded only where sinks + window exceed it."""
    model = get_model("qwen2_5_vl")
    inputs = visual_inputs(images=1, grid=8, seed=2, text_before=10, question=0)
    budget = 14
    _, report, kept, _ = run_under(model, HybridKV(budget, window=4, sink_tokens=4, max_dynamic_share=0.0),
                                   inputs, max_new_tokens=2)
    length = inputs["input_ids"].shape[1]
    assert report.extra["token_prior"] == "key_diversity" and report.extra["degraded_layers"] > 0
    assert report.budget_exceeded_tokens == 0
    assert all(len(head) == budget for layer in kept for head in layer[0])
    assert all(set(range(4)) | set(range(length - 4, length)) <= set(head) for layer in kept for head in layer[0])


def test_question_free_prior_changes_nothing_when_the_prompt_has_a_question():
    model = get_model("qwen2_5_vl")
    inputs = visual_inputs(images=2, grid=8, seed=3)
    runs = [run_under(model, HybridKV(0.2, question_free_prior=prior), inputs, max_new_tokens=4)
            for prior in ("key_diversity", "attention")]
    assert runs[0][1].extra["token_prior"] == runs[1][1].extra["token_prior"] == "text_prior"
    assert torch.equal(runs[0][0], runs[1][0]) and runs[0][2] == runs[1][2]


def test_question_free_prior_is_checked():
    with pytest.raises(ValueError, match="question_free_prior must be one of"):
        HybridKV(0.1, question_free_prior="keys")
    with pytest.raises(ValueError, match="diversity_kernel must be odd"):
        HybridKV(0.1, diversity_kernel=4)
    with pytest.raises(ValueError, match="diversity_anchor must be an int >= 1"):
        HybridKV(0.1, diversity_anchor=0)
    with pytest.raises(ValueError, match=r"derotate_share must be a number in \[0, 1\]"):
        HybridKV(0.1, derotate_share=1.5)
    with pytest.raises(ValueError, match=r"consensus_share must be a number in \[0, 1\]"):
        HybridKV(0.1, consensus_share=-0.1)
    with pytest.raises(ValueError, match="consensus_from must be below 1.0"):
        HybridKV(0.1, consensus_from=1.0)
