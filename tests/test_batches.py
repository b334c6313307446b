"""Batches with left padding, beam search and several returned sequences: every ``generate()``
a user writes works, exact at budget 1.0 against plain batched ``generate()``."""

import pytest
import torch
from conftest import get_model, run_under
from test_positions import left_padded
from transformers import DynamicCache

from hybridkv import AdaKV, FullKV, HybridKV, Quest, SnapKV
from hybridkv.models.tiny import text_inputs, visual_inputs

KW = {"max_new_tokens": 6, "do_sample": False, "output_logits": True, "return_dict_in_generate": True}
FULL_BUDGET = [FullKV, lambda: SnapKV(1.0), lambda: AdaKV(1.0), lambda: HybridKV(1.0), lambda: Quest(1.0)]
FULL_IDS = ["FullKV", "SnapKV", "AdaKV", "HybridKV", "Quest"]


def vision_batch() -> dict:
    """Two Qwen-VL prompts of different lengths, left-padded: 2 images in the first row, 1 (of
    another size) and more text in the second; pixel values in row order."""
    first = visual_inputs(images=2, grid=8, seed=1, question=6)
    second = visual_inputs(images=1, grid=12, seed=2, question=20)
    batch = left_padded([first, second])
    batch["pixel_values"] = torch.cat([first["pixel_values"], second["pixel_values"]])
    batch["image_grid_thw"] = torch.cat([first["image_grid_thw"], second["image_grid_thw"]])
    return batch


BATCHES = {
    "llama": lambda: left_padded([text_inputs(120, seed=1), text_inputs(70, seed=2)]),
    "qwen2": lambda: left_padded([text_inputs(60, seed=3), text_inputs(110, seed=4), text_inputs(95, seed=5)]),
    "qwen2_5_vl": vision_batch,
}


@pytest.mark.parametrize("make_method", FULL_BUDGET, ids=FULL_IDS)
@pytest.mark.parametrize("model_type", list(BATCHES))
def test_left_padded_batch_is_exact_at_full_budget(model_type, make_method):
    model, inputs = get_model(model_type), BATCHES[model_type]()
    ref = model.generate(**inputs, **KW)
    out, report, kept, _ = run_under(model, make_method(), inputs, **KW)
    assert torch.equal(out.sequences, ref.sequences)
    assert max((a - b).abs().max().item() for a, b in zip(out.logits, ref.logits)) < 1e-4
    real = inputs["attention_mask"].sum(-1).tolist()
    assert [s.prompt_tokens for s in report.sequences] == real and report.prompt_tokens == sum(real)
    width = inputs["input_ids"].shape[1]
    for b, n in enumerate(real):  # padding is never kept; at 1.0 every real token is (Quest pages the rest)
        assert all(p >= width - n for layer in kept for head in layer[b] for p in head)
        if report.method != "Quest":
            assert all(head == list(range(width - n, width)) for layer in kept for head in layer[b])


def test_vision_rows_find_their_own_spans():
    model, inputs = get_model("qwen2_5_vl"), vision_batch()
    _, report, _, _ = run_under(model, SnapKV(0.5, window_size=4), inputs)
    assert [s.visual_tokens for s in report.sequences] == [2 * 16, 36]
    assert [s.query_tokens for s in report.sequences] == [7, 21]  # <|vision_end|> and the question


@pytest.mark.parametrize("make_method,query", [(lambda: SnapKV(0.3, window_size=4), None),
                                               (lambda: HybridKV(0.5, threshold=1.1), None),
                                               (lambda: HybridKV(0.3), 0)],
                         ids=["SnapKV", "HybridKV", "HybridKV-question-free"])
def test_compressed_batch_rows_equal_each_row_alone(make_method, query):
    """A row of a padded batch gets the tokens it gets alone (compression is per row; without a
    question, HybridKV's model-wide ranking is per row too)."""
    model = get_model("llama")
    prompts = [text_inputs(120, seed=1), text_inputs(70, seed=2)]
    batch, _, _, _ = run_under(model, make_method(), left_padded(prompts), query, max_new_tokens=6)
    for b, prompt in enumerate(prompts):
        alone, _, _, _ = run_under(model, make_method(), prompt, query, max_new_tokens=6)
        assert torch.equal(batch[b, -6:], alone[0, -6:])


BEAMS = {"num_beams": 3, "num_return_sequences": 2, "max_new_tokens": 6, "do_sample": False}


@pytest.mark.parametrize("make_method", FULL_BUDGET[:4], ids=FULL_IDS[:4])
@pytest.mark.parametrize("model_type,inputs", [("llama", lambda: text_inputs(100, seed=6)),
                                               ("qwen2_5_vl", lambda: visual_inputs(images=2, grid=8, seed=6))],
                         ids=["llama", "qwen2_5_vl"])
def test_beam_search_is_exact_at_full_budget(model_type, inputs, make_method):
    model, prompt = get_model(model_type), inputs()
    ref = model.generate(**prompt, **BEAMS)
    out, report, _, _ = run_under(model, make_method(), prompt, **BEAMS)
    assert torch.equal(out, ref)
    assert report.batch_size == 3  # the prompt expanded into the beams


def test_beam_search_runs_compressed_and_reorders_rows():
    model, prompt = get_model("llama"), text_inputs(100, seed=6)
    out, report, _, walked = run_under(model, HybridKV(0.3, threshold=1.1), prompt, **BEAMS)
    assert out.shape == (2, 106)
    assert report.resident_kv_bytes + report.offloaded_kv_bytes == walked


def test_sampling_several_sequences_is_exact_at_full_budget():
    model, prompt = get_model("qwen2"), text_inputs(90, seed=7)
    kwargs = {"do_sample": True, "num_return_sequences": 3, "max_new_tokens": 6, "top_k": 0}
    torch.manual_seed(11)
    ref = model.generate(**prompt, **kwargs)
    torch.manual_seed(11)
    out, report, _, _ = run_under(model, FullKV(), prompt, **kwargs)
    assert torch.equal(out, ref) and report.batch_size == 3


def test_a_compressed_cache_repeated_into_several_sequences_decodes_each_like_the_original():
    """batch_repeat_interleave on a compressed cache (as generate() expands a prompt after its
    prefill): every copy decodes like the original, and the report maps rows to the prompt."""
    model, prompt = get_model("llama"), text_inputs(100, seed=8)
    method = HybridKV(0.4, threshold=1.1, chunk_size=4)
    with torch.inference_mode(), method.apply(model, query_tokens=16) as engine:
        cache = DynamicCache()
        out = model(**prompt, past_key_values=cache, use_cache=True)
        token = out.logits[:, -1:].argmax(-1)
        cache.batch_repeat_interleave(3)
        steps = model(input_ids=token.expand(3, 1), past_key_values=cache, use_cache=True).logits
        report = engine.report
    assert torch.allclose(steps[0], steps[1]) and torch.allclose(steps[0], steps[2])
    assert report.batch_size == 3 and [s.prompt_tokens for s in report.sequences] == [100] * 3
