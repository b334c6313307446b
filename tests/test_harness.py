"""The shared-prefill path measures what users run: same tokens as method.apply + generate."""

import pytest
import torch

from conftest import get_model, make_inputs
from hybridkv import AdaKV, FullKV, HybridKV, SnapKV, StreamingLLM
from hybridkv.harness import capture_prefill, decode, mean_kl, prefix_agreement

NEW = 8


def all_methods():
    from hybridkv import methods

    extra = [getattr(methods, name)(0.3) for name in ("H2O", "PyramidKV", "Quest") if hasattr(methods, name)]
    return [FullKV(), StreamingLLM(0.3), SnapKV(0.3, window_size=8), AdaKV(0.3, window_size=8),
            HybridKV(0.5, chunk_size=4, window=4, threshold=1.1)] + extra


@pytest.mark.parametrize("model_type,kind,query", [("llama", "text", 12), ("qwen2", "text", None)])
def test_shared_prefill_matches_generate_for_every_method(model_type, kind, query):
    model, inputs = get_model(model_type), make_inputs(kind)
    capture = capture_prefill(model, inputs, query_tokens=query)
    for method in all_methods():
        with method.apply(model, query_tokens=query):
            ref = model.generate(**inputs, max_new_tokens=NEW, do_sample=False, output_logits=True,
                                 return_dict_in_generate=True)
        ref_report = method.report
        shared = decode(model, method, capture, NEW)
        name = type(method).__name__
        assert torch.equal(shared.tokens, ref.sequences[0, inputs["input_ids"].shape[1]:]), name
        assert (shared.logits - torch.cat(ref.logits)).abs().max() < 1e-4, name
        assert shared.report.head_budgets == ref_report.head_budgets, name


def test_teacher_forcing_and_fidelity_metrics():
    model, inputs = get_model("llama"), make_inputs("text")
    capture = capture_prefill(model, inputs, query_tokens=12)
    full = decode(model, FullKV(), capture, NEW)
    assert prefix_agreement(full.tokens, full.tokens) == 1.0
    assert mean_kl(full.logits, full.logits) == pytest.approx(0.0, abs=1e-6)
    forced = decode(model, SnapKV(0.1, window_size=4), capture, NEW, forced=full.tokens)
    assert torch.equal(forced.tokens, full.tokens)
    assert mean_kl(full.logits, forced.logits) > 0.0
    assert prefix_agreement(torch.tensor([1, 2, 9, 4]), torch.tensor([1, 2, 3, 4])) == 0.5
