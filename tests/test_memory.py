"""Freed KV is really freed: bytes walked from the cache's tensors equal the report and fall
with the budget; AdaKV's per-head budgets hold the sum of the heads, not kv_heads x the largest."""

import torch
from conftest import get_model

from hybridkv import AdaKV, FullKV, SnapKV
from hybridkv.models.tiny import visual_inputs


def walked_bytes(cache) -> int:
    """Bytes of every distinct tensor storage held by the cache's layers (test's own walk)."""
    storages = {}
    for layer in cache.layers:
        for value in vars(layer).values():
            if isinstance(value, torch.Tensor):
                storages[value.untyped_storage().data_ptr()] = value.untyped_storage().nbytes()
    return sum(storages.values())


def run(method, inputs, new_tokens=6):
    model = get_model("qwen2_5_vl")
    with method.apply(model):
        model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False)
    return method


def test_adakv_bytes_equal_report_and_fall_with_budget():
    inputs = visual_inputs(images=4, grid=16, seed=1)  # 256 visual tokens
    held = []
    for budget in (0.1, 0.25, 0.5):
        method = run(AdaKV(budget, window_size=8), inputs)
        report = method.report
        walked = walked_bytes(method._engine.cache)
        assert walked == report.resident_kv_bytes
        held.append(walked)
        lengths = [n for layer in report.head_budgets for n in layer]
        assert len(set(lengths)) > 1  # per-head budgets differ
        per_layer = round(budget * report.prompt_tokens) * 2
        assert all(total == per_layer for total in report.layer_budgets)
    assert held[0] < held[1] < held[2]


def test_flat_storage_holds_the_sum_of_head_budgets():
    inputs = visual_inputs(images=4, grid=16, seed=1)
    method = run(AdaKV(0.1, window_size=8), inputs, new_tokens=2)
    cache = method._engine.cache
    for layer, lengths in zip(cache.layers, method.report.head_budgets):
        assert layer.prefix_keys.shape[0] == sum(lengths)
        assert layer.prefix_keys.untyped_storage().nbytes() == sum(lengths) * layer.head_dim * 4
        assert sum(lengths) < len(lengths) * max(lengths)  # a padded layout would hold more


def test_full_kv_bytes_matches_a_dynamic_cache():
    inputs = visual_inputs(images=2, grid=16, seed=2)
    model = get_model("qwen2_5_vl")
    out = model.generate(**inputs, max_new_tokens=5, do_sample=False, return_dict_in_generate=True)
    dynamic = sum(layer.keys.untyped_storage().nbytes() + layer.values.untyped_storage().nbytes()
                  for layer in out.past_key_values.layers)
    method = run(FullKV(), inputs, new_tokens=5)
    assert method.report.full_kv_bytes == dynamic


def test_compression_ratio_near_ten_at_ten_percent():
    inputs = visual_inputs(images=4, grid=32, seed=3)  # 1024 visual tokens
    report = run(SnapKV(0.1), inputs, new_tokens=4).report
    assert report.compression_ratio > 8.0
