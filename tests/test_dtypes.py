"""bf16 (and fp16) everywhere: at budget 1.0 every supported architecture gives the tokens of
plain ``generate()`` in the same dtype, and every method runs."""

import pytest
import torch
from conftest import CASES, make_inputs, run_under
from test_registry import NAMES, build

from hybridkv import FullKV, SnapKV
from hybridkv.models.tiny import tiny_model

_MODELS: dict = {}


def model_in(model_type: str, dtype: torch.dtype):
    if (model_type, dtype) not in _MODELS:
        _MODELS[(model_type, dtype)] = tiny_model(model_type, dtype=dtype)
    return _MODELS[(model_type, dtype)]


def cast(inputs: dict, dtype: torch.dtype) -> dict:
    return {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in inputs.items()}


KW = {"max_new_tokens": 8, "do_sample": False, "output_logits": True, "return_dict_in_generate": True}


@pytest.mark.parametrize("model_type,kind", CASES, ids=[f"{m}-{k}" for m, k in CASES])
def test_bf16_full_budget_gives_the_tokens_of_plain_bf16_generate(model_type, kind):
    model = model_in(model_type, torch.bfloat16)
    inputs = cast(make_inputs(kind, model_type=model_type), torch.bfloat16)
    ref = model.generate(**inputs, **KW)
    for method in (FullKV(), SnapKV(1.0)):
        out, report, _, _ = run_under(model, method, inputs, **KW)
        assert torch.equal(out.sequences, ref.sequences), type(method).__name__
        assert report.full_kv_bytes % 2 == 0 and out.logits[0].dtype == ref.logits[0].dtype


@pytest.mark.parametrize("model_type,kind", [("llama", "text"), ("qwen2_5_vl", "multi_image")])
def test_fp16_full_budget_gives_the_tokens_of_plain_fp16_generate(model_type, kind):
    model = model_in(model_type, torch.float16)
    inputs = cast(make_inputs(kind, model_type=model_type), torch.float16)
    ref = model.generate(**inputs, **KW)
    out, _, _, _ = run_under(model, FullKV(), inputs, **KW)
    assert torch.equal(out.sequences, ref.sequences)


@pytest.mark.parametrize("name", NAMES)
def test_every_method_runs_in_bf16(name):
    model = model_in("qwen2_5_vl", torch.bfloat16)
    inputs = cast(make_inputs("multi_image"), torch.bfloat16)
    out, report, _, walked = run_under(model, build(name, 0.5, "qwen2_5_vl", "multi_image"), inputs, max_new_tokens=4)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 4
    assert report.resident_kv_bytes + report.offloaded_kv_bytes == walked
