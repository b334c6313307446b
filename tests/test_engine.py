"""The engine owns every per-prompt state: a method object is configuration, works across models,
prompts and threads, and holds nothing after its block; the decoding step compiles and never
synchronises with the host."""

import dataclasses
import gc
import threading
import weakref

import torch
from conftest import get_model, make_inputs, run_under
from torch.profiler import ProfilerActivity, profile
from transformers import DynamicCache

from hybridkv import FullKV, HybridKV, SnapKV
from hybridkv.models.tiny import text_inputs, tiny_model


def test_a_method_object_is_configuration_only():
    method = HybridKV(0.3, threshold=1.1)
    before = dict(vars(method))
    run_under(get_model("qwen2_5_vl"), method, make_inputs("multi_image"))
    assert vars(method) == before  # running it wrote nothing on it
    assert set(vars(method)) == {f.name for f in dataclasses.fields(method)}
    assert repr(method).startswith("HybridKV(budget=0.3, online")


def test_one_method_object_serves_two_models_one_after_the_other():
    method = SnapKV(0.3, window_size=4)
    _, vl, _, _ = run_under(get_model("qwen2_5_vl"), method, make_inputs("image"))
    _, text, _, _ = run_under(get_model("llama"), method, make_inputs("text"))
    assert (vl.visual_tokens, text.visual_tokens) == (36, 0)
    assert method.report == text  # the last prompt's report


def test_one_method_object_in_two_threads_at_once():
    method = HybridKV(0.3, threshold=1.1)
    models = {"a": tiny_model("llama", seed=1), "b": tiny_model("qwen2", seed=2)}
    prompts = {"a": text_inputs(100, seed=1), "b": text_inputs(80, seed=2)}
    expected = {k: run_under(models[k], method, prompts[k], max_new_tokens=6)[0] for k in models}
    results, barrier = {}, threading.Barrier(2)

    def worker(key):
        barrier.wait()
        with torch.inference_mode(), method.apply(models[key]):
            out = models[key].generate(**prompts[key], max_new_tokens=6, do_sample=False)
        results[key] = (out, method.report)  # this thread's report

    threads = [threading.Thread(target=worker, args=(k,)) for k in models]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for key in models:
        out, report = results[key]
        assert torch.equal(out, expected[key])
        assert report.prompt_tokens == prompts[key]["input_ids"].shape[1]


@dataclasses.dataclass(eq=False, kw_only=True)
class _Surveying(SnapKV):
    """SnapKV whose plan surveys: records every call and what the engine holds at each."""

    calls: list = dataclasses.field(default_factory=list)

    def plan(self, spec, spans, tokens_per_head):
        plan = super().plan(spec, spans, tokens_per_head)
        plan.surveys = True
        return plan

    def survey(self, ctx, plan):
        stored = [layer.stored for layer in self.engine.layers]
        self.calls.append(("survey", ctx.layer_idx, ctx.queries.shape[1], stored))

    def compress(self, ctx, plan):
        self.calls.append(("compress", ctx.layer_idx, ctx.queries.shape[1], None))
        return super().compress(ctx, plan)


def test_a_surveying_plan_sees_every_layer_before_any_is_compressed():
    """The engine shows a surveying method every layer of the prompt, in order, while every
    layer filled so far still holds the whole prompt; it then compresses them in order with the same contexts,
    which keep only the text-prior query rows; the tokens are those of the same method
    compressing layer by layer."""
    model, inputs = get_model("llama"), text_inputs(100, seed=3)
    layers = model.config.num_hidden_layers
    method = _Surveying(0.3, window_size=4)
    with method.apply(model, query_tokens=12) as engine:
        method.engine = engine
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    length = inputs["input_ids"].shape[1]
    assert [c[:2] for c in method.calls] == ([("survey", i) for i in range(layers)]
                                            + [("compress", i) for i in range(layers)])
    assert all(c[2] == 12 for c in method.calls)  # the question's rows, not the prompt's
    assert all(c[3][: c[1] + 1] == [length] * (c[1] + 1) for c in method.calls if c[0] == "survey")  # uncompressed
    reference, _, _, _ = run_under(model, SnapKV(0.3, window_size=4), inputs, query_tokens=12, max_new_tokens=4)
    assert torch.equal(out, reference)


def test_leaving_the_block_releases_the_cache_and_keeps_the_report():
    model = get_model("llama")
    method = SnapKV(0.3, window_size=4)
    with method.apply(model) as engine:
        model.generate(**make_inputs("text"), max_new_tokens=3, do_sample=False)  # the cache is not returned
        layer = weakref.ref(engine.layers[0])
        live = method.report
    gc.collect()
    assert layer() is None  # nothing of ours holds the cache any more
    assert method.report == live == engine.report  # frozen when the block was left
    assert not hasattr(model, "_hybridkv_engine")


def test_compiled_decoding_gives_the_tokens_of_eager_decoding():
    model = get_model("llama")
    inputs = text_inputs(150, seed=3)
    for make in (lambda: SnapKV(0.3, window_size=8), lambda: HybridKV(0.4, threshold=1.1, chunk_size=4)):
        eager = run_under(model, make(), inputs, query_tokens=16, max_new_tokens=10, output_logits=True,
                          return_dict_in_generate=True)[0]
        with make().apply(model, query_tokens=16, compile=True):
            compiled = model.generate(**inputs, max_new_tokens=10, do_sample=False, output_logits=True,
                                      return_dict_in_generate=True)
        assert torch.equal(compiled.sequences, eager.sequences)
        assert max((a - b).abs().max().item() for a, b in zip(compiled.logits, eager.logits)) < 1e-4


def test_a_decoding_step_has_no_host_synchronisation():
    """Profiler count of aten::item / aten::_local_scalar_dense over a whole decoding forward
    (every layer's cache update, retrieval and attention, and the model around them)."""
    model = get_model("llama")
    inputs = text_inputs(150, seed=3)
    for method in (FullKV(), SnapKV(0.3, window_size=8), HybridKV(0.4, threshold=1.1, chunk_size=4)):
        with torch.inference_mode(), method.apply(model, query_tokens=16) as engine:
            cache = DynamicCache()
            out = model(**inputs, past_key_values=cache, use_cache=True)
            token = out.logits[:, -1:].argmax(-1)
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                model(input_ids=token, past_key_values=cache, use_cache=True)
            retrieving = any(layer.retriever is not None for layer in engine.layers)
        names = {e.key: e.count for e in prof.key_averages()}
        assert names.get("aten::scaled_dot_product_attention") == 2  # one call per layer
        assert names.get("aten::item", 0) + names.get("aten::_local_scalar_dense", 0) == 0, type(method).__name__
        assert retrieving == isinstance(method, HybridKV)
