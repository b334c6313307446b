"""Bad input gets a clear error that says what to do."""

import pytest
import torch
from conftest import get_model
from transformers import GPT2Config, GPT2LMHeadModel

from hybridkv import AdaKV, FullKV, SnapKV, StreamingLLM, UnsupportedModelError
from hybridkv.models.tiny import text_inputs


@pytest.mark.parametrize("budget", [0, 0.0, 1.5, -0.1, -3])
def test_budget_outside_range(budget):
    with pytest.raises(ValueError, match="budget"):
        SnapKV(budget)


def test_budget_wrong_type():
    with pytest.raises(TypeError, match="budget"):
        AdaKV(True)
    with pytest.raises(TypeError, match="budget"):
        StreamingLLM("0.1")


def test_unsupported_model_names_supported_ones():
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100))
    with pytest.raises(UnsupportedModelError, match="Qwen2.5-VL.*Llama"):
        SnapKV(0.5).apply(model)


def test_query_tokens_longer_than_prompt():
    model = get_model("llama")
    with pytest.raises(ValueError, match="query_tokens"), SnapKV(0.5).apply(model, query_tokens=500):
        model.generate(**text_inputs(100), max_new_tokens=2)


def test_int_budget_longer_than_prompt():
    model = get_model("llama")
    with pytest.raises(ValueError, match="exceeds the prompt"), SnapKV(400).apply(model):
        model.generate(**text_inputs(100), max_new_tokens=2)


def test_applied_twice():
    model = get_model("qwen2")
    with SnapKV(0.5).apply(model), pytest.raises(RuntimeError, match="already applied"), AdaKV(0.5).apply(model):
        pass


def test_generate_after_exit_runs_plain():
    model = get_model("qwen2")
    inputs = text_inputs(80)
    ref = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    method = SnapKV(0.1, window_size=4)
    with method.apply(model):
        compressed = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    after = model.generate(**inputs, max_new_tokens=6, do_sample=False, return_dict_in_generate=True)
    assert torch.equal(after.sequences, ref)
    assert type(after.past_key_values.layers[0]).__name__ == "DynamicLayer"
    assert not hasattr(model, "_hybridkv_engine")
    assert method.report.prompt_tokens == 80  # the report survives the context
    assert compressed.shape == ref.shape


def test_batch_larger_than_one():
    model = get_model("llama")
    inputs = {k: v.repeat(2, 1) for k, v in text_inputs(50).items()}
    with pytest.raises(ValueError, match="batch size 1"), FullKV().apply(model):
        model.generate(**inputs, max_new_tokens=2)


def test_padded_prompt():
    model = get_model("llama")
    inputs = text_inputs(50)
    inputs["attention_mask"][0, :3] = 0
    with pytest.raises(ValueError, match="padded"), FullKV().apply(model):
        model.generate(**inputs, max_new_tokens=2)


def test_cache_filled_outside_the_method():
    from transformers import DynamicCache

    model = get_model("llama")
    inputs = text_inputs(30)
    cache = DynamicCache()
    model(**inputs, past_key_values=cache)
    with pytest.raises(ValueError, match="outside the active hybridkv method"), FullKV().apply(model):
        model(input_ids=inputs["input_ids"][:, :1], past_key_values=cache)
