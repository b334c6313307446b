"""One suite over every registered method: it runs, it is exact at budget 1.0, and its report
counts the bytes walked from the cache. Adding a method to the registry adds it here."""

import pytest
import torch
from conftest import get_model, make_inputs, run_under
from test_exactness import generate

from hybridkv import profile_heads
from hybridkv.methods import REGISTRY, FullKV, make_method, register
from hybridkv.methods.registry import needs_profile

CASES = [("qwen2_5_vl", "multi_image"), ("llama", "text")]
_PROFILES: dict = {}


def profile_for(model_type: str, kind: str):
    """A head profile of the case's model (SparseMM and HybridKV-offline need one)."""
    if model_type not in _PROFILES:
        _PROFILES[model_type] = profile_heads(get_model(model_type), [make_inputs(kind, seed=5)], decode_tokens=3,
                                              query_tokens=12 if kind == "text" else None)
    return _PROFILES[model_type]


def build(name: str, budget: float, model_type: str, kind: str):
    profile = profile_for(model_type, kind) if needs_profile(name) else None
    return make_method(name, budget, profile)


NAMES = sorted(REGISTRY)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("model_type,kind", CASES, ids=[f"{m}-{k}" for m, k in CASES])
def test_every_method_runs_and_reports_the_bytes_walked(name, model_type, kind):
    model, inputs = get_model(model_type), make_inputs(kind)
    query = 12 if kind == "text" else None
    out, report, kept, walked = run_under(model, build(name, 0.5, model_type, kind), inputs, query_tokens=query,
                                          max_new_tokens=4)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 4
    assert report.method == name
    assert report.resident_kv_bytes + report.offloaded_kv_bytes == walked
    assert report.layer_budgets == [sum(heads) for heads in report.head_budgets]
    if name != "FullKV" and name != "Quest":  # Quest keeps every page (it bounds attention, not memory)
        assert walked < report.full_kv_bytes


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("model_type,kind", CASES, ids=[f"{m}-{k}" for m, k in CASES])
def test_every_method_is_exact_at_full_budget(name, model_type, kind):
    model, inputs = get_model(model_type), make_inputs(kind)
    ref = generate(model, inputs)
    out = generate(model, inputs, build(name, 1.0, model_type, kind))
    assert torch.equal(out.sequences, ref.sequences)
    assert max((a - b).abs().max().item() for a, b in zip(out.logits, ref.logits)) < 1e-4


@pytest.mark.parametrize("name", [n for n in NAMES if n != "FullKV"])
@pytest.mark.parametrize("budget", [0, 1.5, -2, True])
def test_every_method_refuses_a_meaningless_budget(name, budget):
    with pytest.raises((ValueError, TypeError), match="budget"):
        REGISTRY[name](budget)


def test_a_registered_method_is_found_by_name_with_its_parameters():
    from dataclasses import dataclass

    @register
    @dataclass(eq=False, kw_only=True)
    class KeepFirst(FullKV):
        """Test-only method: FullKV under another name, with one parameter."""

        note: int = 0

    try:
        method = make_method("KeepFirst:note=3", 0.1)
        assert isinstance(method, KeepFirst) and method.note == 3
        with pytest.raises(ValueError, match="parameters: note"):
            make_method("KeepFirst:other=1", 0.1)
    finally:
        del REGISTRY["KeepFirst"]


def test_method_options_parse_numbers_booleans_and_none():
    from hybridkv.methods.registry import parse_options

    assert parse_options("pool=4,coverage=0.5,flag=True,diversity_anchor=None,store=host,x=False") == {
        "pool": 4, "coverage": 0.5, "flag": True, "diversity_anchor": None, "store": "host", "x": False}
    assert make_method("HybridKV:derotate_share=0.5", 0.1).derotate_share == 0.5
