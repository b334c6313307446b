"""Bad input gets a clear error that says what to do."""

import pytest
import torch
from conftest import get_model
from transformers import DynamicCache, GPT2Config, GPT2LMHeadModel

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
    with method.apply(model) as engine:
        compressed = model.generate(**inputs, max_new_tokens=6, do_sample=False, return_dict_in_generate=True)
    after = model.generate(**inputs, max_new_tokens=6, do_sample=False, return_dict_in_generate=True)
    assert torch.equal(after.sequences, ref)
    assert type(after.past_key_values.layers[0]).__name__ == "DynamicLayer"
    assert not hasattr(model, "_hybridkv_engine")
    assert method.report.prompt_tokens == 80  # the report survives the context
    assert all(layer.detached for layer in compressed.past_key_values.layers)  # the cache refuses further use
    assert engine.layers is None and engine.cache is None  # the engine let go of it
    assert compressed.sequences.shape == ref.shape


def test_a_4d_mask_is_refused():
    model = get_model("llama")
    inputs = text_inputs(20)
    mask = torch.ones(1, 1, 20, 20, dtype=torch.bool).tril()
    with pytest.raises(ValueError, match="2D"), FullKV().apply(model):
        model(input_ids=inputs["input_ids"], attention_mask=mask)


def test_a_forward_with_fewer_sequences_than_the_cache():
    model = get_model("llama")
    ids = text_inputs(30)["input_ids"].repeat(2, 1)
    with FullKV().apply(model):
        cache = DynamicCache()
        model(input_ids=ids, past_key_values=cache)
        with pytest.raises(ValueError, match="cache holds 2"):
            model(input_ids=ids[:1, :1], past_key_values=cache)


def test_a_compressed_cache_after_the_block_is_refused():
    model = get_model("llama")
    inputs = text_inputs(30)
    with SnapKV(0.5, window_size=4).apply(model):
        out = model.generate(**inputs, max_new_tokens=2, do_sample=False, return_dict_in_generate=True)
    ids = torch.cat([out.sequences, out.sequences[:, -1:]], dim=1)
    with pytest.raises(RuntimeError, match="has ended"):
        model.generate(input_ids=ids, past_key_values=out.past_key_values, max_new_tokens=2)


def test_cropping_into_the_compressed_prompt_is_refused():
    model = get_model("llama")
    with SnapKV(0.5, window_size=4).apply(model):
        out = model.generate(**text_inputs(30), max_new_tokens=4, do_sample=False, return_dict_in_generate=True)
        out.past_key_values.crop(31)  # generated tokens can be forgotten (assisted decoding does)
        assert out.past_key_values.get_seq_length() == 31
        with pytest.raises(ValueError, match="already compressed"):
            out.past_key_values.crop(20)


def test_without_cache_is_refused():
    model = get_model("llama")
    with pytest.raises(ValueError, match="use_cache=True"), FullKV().apply(model):
        model(**text_inputs(20), use_cache=False)


def test_unknown_methods_and_parameters_name_the_known_ones():
    from hybridkv.methods import make_method

    with pytest.raises(ValueError, match="known: .*SnapKV"):
        make_method("SnapKW", 0.1)
    with pytest.raises(ValueError, match="parameters: budget, window_size, kernel_size, alpha_safeguard"):
        make_method("AdaKV:alpha=0.3", 0.1)
    with pytest.raises(ValueError, match="key=value"):
        make_method("AdaKV:alpha", 0.1)
    with pytest.raises(ValueError, match="needs a head profile"):
        make_method("HybridKV-offline", 0.1)


def test_cache_filled_outside_the_method():
    model = get_model("llama")
    inputs = text_inputs(30)
    cache = DynamicCache()
    model(**inputs, past_key_values=cache)
    with pytest.raises(ValueError, match="outside the active hybridkv method"), FullKV().apply(model):
        model(input_ids=inputs["input_ids"][:, :1], past_key_values=cache)
