"""Freed KV is really freed: bytes walked from the cache's tensors equal the report and fall with
the budget; the layout holds each layer's rectangle of its longest row, nothing more."""

import torch
from conftest import get_model, run_under

from hybridkv import AdaKV, FullKV, HybridKV, SnapKV
from hybridkv.models.tiny import visual_inputs


def test_adakv_bytes_equal_report_and_fall_with_budget():
    model = get_model("qwen2_5_vl")
    inputs = visual_inputs(images=4, grid=16, seed=1)  # 256 visual tokens
    held = []
    for budget in (0.1, 0.25, 0.5):
        _, report, kept, walked = run_under(model, AdaKV(budget, window_size=8), inputs, max_new_tokens=6)
        assert walked == report.resident_kv_bytes + report.offloaded_kv_bytes
        held.append(walked)
        lengths = [len(head) for layer in kept for head in layer[0]]
        assert len(set(lengths)) > 1  # per-head budgets differ
        per_layer = round(budget * report.prompt_tokens) * 2
        assert all(total == per_layer for total in report.layer_budgets)
        assert report.layer_budgets == [sum(len(head) for head in layer[0]) for layer in kept]
    assert held[0] < held[1] < held[2]


def test_each_layer_holds_its_longest_row_and_no_more():
    """The kept region of a layer is as wide as its row with the most entries (AdaKV's uneven
    heads pad the others up to it); the uncompressed region grows in 1.5x steps."""
    model = get_model("qwen2_5_vl")
    inputs = visual_inputs(images=4, grid=16, seed=1)
    with AdaKV(0.1, window_size=8).apply(model) as engine:
        model.generate(**inputs, max_new_tokens=2, do_sample=False)
        for layer in engine.layers:
            counts = (layer.kept_positions >= 0).sum(-1)
            assert layer.kept_width == int(counts.max())
            assert layer.keys.shape == (1, layer.kv_heads, layer.keys.shape[2], layer.head_dim)
            assert layer.keys.shape[2] - layer.stored <= max(8, layer.keys.shape[2] // 3)
            assert layer.keys.untyped_storage().nbytes() == layer.keys.numel() * 4


def test_full_kv_bytes_matches_a_dynamic_cache():
    inputs = visual_inputs(images=2, grid=16, seed=2)
    model = get_model("qwen2_5_vl")
    out = model.generate(**inputs, max_new_tokens=5, do_sample=False, return_dict_in_generate=True)
    dynamic = sum(layer.keys.untyped_storage().nbytes() + layer.values.untyped_storage().nbytes()
                  for layer in out.past_key_values.layers)
    _, report, _, _ = run_under(model, FullKV(), inputs, max_new_tokens=5)
    assert report.full_kv_bytes == dynamic


def test_compression_ratio_near_ten_at_ten_percent():
    inputs = visual_inputs(images=4, grid=32, seed=3)  # 1024 visual tokens
    _, report, _, _ = run_under(get_model("qwen2_5_vl"), SnapKV(0.1), inputs, max_new_tokens=4)
    assert report.compression_ratio > 8.0


def test_batch_report_per_sequence_and_in_total():
    model = get_model("llama")
    ids = torch.randint(1, 1000, (2, 120), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :40] = 0
    _, report, kept, walked = run_under(model, HybridKV(0.5, threshold=1.1), {"input_ids": ids, "attention_mask": mask},
                                        max_new_tokens=3)
    assert report.batch_size == 2 and [s.prompt_tokens for s in report.sequences] == [120, 80]
    assert report.prompt_tokens == 200
    assert report.resident_kv_bytes == walked == sum(s.resident_kv_bytes for s in report.sequences)
    assert report.full_kv_bytes == sum(s.full_kv_bytes for s in report.sequences)
    assert report.head_budgets == [[a + b for a, b in zip(*(s.head_budgets[i] for s in report.sequences))]
                                   for i in range(2)]
    # the shorter prompt keeps fewer tokens: budgets are fractions of each sequence's own prompt
    assert sum(map(sum, report.sequences[1].head_budgets)) < sum(map(sum, report.sequences[0].head_budgets))
