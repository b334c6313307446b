"""A model dispatched by accelerate (device_map, a layer offloaded to disk and loaded by its hooks
at every forward) runs under hybridkv as the undispatched model does."""

import pytest
import torch
from conftest import run_under

from hybridkv import FullKV, HybridKV, SnapKV
from hybridkv.models.tiny import text_inputs, tiny_model

accelerate = pytest.importorskip("accelerate")


@pytest.mark.parametrize("make_method", [FullKV, lambda: SnapKV(0.3, window_size=8),
                                         lambda: HybridKV(0.4, threshold=1.1, chunk_size=4)],
                         ids=["FullKV", "SnapKV", "HybridKV"])
def test_dispatched_model_gives_the_undispatched_tokens(make_method, tmp_path):
    inputs = text_inputs(100, seed=2)
    reference, ref_report, _, _ = run_under(tiny_model("llama", layers=3), make_method(), inputs, max_new_tokens=6)
    device_map = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
                  "model.layers.2": "cpu", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    model = accelerate.dispatch_model(tiny_model("llama", layers=3), device_map=device_map,
                                      offload_dir=str(tmp_path), main_device="cpu")
    assert model.model.layers[1].self_attn.q_proj.weight.device.type == "meta"  # loaded by the hooks per forward
    with make_method().apply(model) as engine:
        out = model.generate(**inputs, max_new_tokens=6, do_sample=False)
        assert all(layer.device.type == "cpu" for layer in engine.layers)  # each layer's cache on its layer's device
        report = engine.report
    assert torch.equal(out, reference)
    assert report.head_budgets == ref_report.head_budgets
