"""Model families added beside Qwen2.5-VL / Qwen2-VL / Qwen2 / Llama: Qwen3-VL, LLaVA-OneVision,
InternVL and Qwen3. Tiny random models built from each family's transformers config class,
prompts shaped as its processor shapes them; the invariant tests of ``conftest.CASES`` run over
them too. This file adds what is specific to a family: what the model consumes, the real image
processors' shapes, prompts mixing images and video, bf16, every method's byte report, manual
decoding, the harness's M-RoPE state, and Qwen3-VL's deepstack features."""

import numpy as np
import pytest
import torch
from conftest import get_model, make_inputs, run_under
from test_exactness import generate, manual_decode
from transformers import DynamicCache, GPT2Config, GPT2LMHeadModel

from hybridkv import (
    H2O,
    AdaKV,
    FullKV,
    HybridKV,
    PyramidKV,
    Quest,
    SnapKV,
    SparseMM,
    StreamingLLM,
    UnsupportedModelError,
    profile_heads,
)
from hybridkv.harness import capture_prefill, decode
from hybridkv.models.architectures import SUPPORTED_MODEL_TYPES, attention_modules, model_spec, text_config
from hybridkv.models.tiny import (
    internvl_image_tiles,
    internvl_inputs,
    llava_onevision_inputs,
    qwen3_vl_inputs,
    special_ids,
    text_inputs,
    tiny_model,
)
from hybridkv.spans import find_spans

VISION_FAMILIES = ("qwen3_vl", "llava_onevision", "internvl")
FAMILY_CASES = [(m, k) for m in VISION_FAMILIES for k in ("image", "multi_image", "video")] + [("qwen3", "text")]
IDS = [f"{m}-{k}" for m, k in FAMILY_CASES]


# ----------------------------------------------------------------- architecture facts
def test_unsupported_model_names_every_supported_family():
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100))
    with pytest.raises(UnsupportedModelError) as error:
        SnapKV(0.5).apply(model)
    message = str(error.value)
    assert "'gpt2'" in message
    for name in ("Qwen2.5-VL", "Qwen2-VL", "Qwen3-VL", "LLaVA-OneVision", "InternVL", "Qwen2 /", "Qwen3 text", "Llama"):
        assert name in message
    assert all(description in message for description in SUPPORTED_MODEL_TYPES.values())


@pytest.mark.parametrize("model_type", [*VISION_FAMILIES, "qwen3"])
def test_spec_reads_the_outer_model_type_the_decoder_and_the_visual_ids(model_type):
    model = get_model(model_type)
    spec = model_spec(model)
    assert spec.model_type == model_type == model.config.model_type
    text = model.config.get_text_config(decoder=True)
    assert (spec.num_layers, spec.num_heads, spec.num_kv_heads, spec.head_dim) == (2, 4, 2, 16)
    modules = attention_modules(model)
    assert modules == [layer.self_attn for layer in model.get_decoder().layers]
    assert text_config(model) is text and (text is not model.config) == (model_type != "qwen3")
    config = model.config
    if model_type == "qwen3_vl":
        assert spec.visual_token_ids == (config.image_token_id, config.video_token_id)
    elif model_type == "llava_onevision":  # stored as *_token_index
        assert spec.visual_token_ids == (config.image_token_index, config.video_token_index)
    elif model_type == "internvl":  # no video id: frames are images
        assert spec.visual_token_ids == (config.image_token_id,)
    else:
        assert spec.visual_token_ids == ()
    assert spec.is_multimodal == (model_type != "qwen3")


def test_tiny_vocabularies_keep_real_special_ids_when_they_fit():
    assert special_ids("internvl", 2048) == {"image_start": 2045, "image_end": 2046, "image": 2047}
    assert special_ids("internvl", 151674) == {"image_start": 151665, "image_end": 151666, "image": 151667}
    big = tiny_model("llava_onevision", vocab_size=151648, layers=1)
    assert model_spec(big).visual_token_ids == (151646, 151647)
    with pytest.raises(ValueError, match="vocab_size"):
        special_ids("qwen3_vl", 1002)


def test_checkpoints_load_through_the_auto_classes_as_supported_models(tmp_path):
    """What ``hybridkv.models.load_model`` does with a checkpoint path: the Auto class of the
    config gives the generation class of each family."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    for model_type in (*VISION_FAMILIES, "qwen3"):
        path = tmp_path / model_type
        get_model(model_type).save_pretrained(path)
        cls = AutoModelForCausalLM if model_type == "qwen3" else AutoModelForImageTextToText
        loaded = cls.from_pretrained(path, attn_implementation="sdpa")
        assert model_spec(loaded) == model_spec(get_model(model_type))


@pytest.mark.parametrize("decoder", ["qwen3", "llama"])
def test_internvl_with_another_decoder(decoder):
    """InternVL checkpoints come with Qwen2 (InternVL3), Qwen3 (InternVL3.5) or Llama-style decoders."""
    from transformers import InternVLConfig, InternVLForConditionalGeneration

    settings = get_model("internvl").config.to_dict()
    settings["text_config"].update(model_type=decoder, head_dim=16)
    torch.manual_seed(0)
    model = InternVLForConditionalGeneration(InternVLConfig.from_dict(settings)).eval()
    model.generation_config.eos_token_id = None
    inputs = make_inputs("image", model_type="internvl")
    assert model_spec(model).num_layers == 2 and type(model.get_decoder()).__name__.lower().startswith(decoder)
    ref = generate(model, inputs)
    for method in (FullKV(), SnapKV(1.0)):
        out = generate(model, inputs, method)
        assert torch.equal(out.sequences, ref.sequences)
        assert max((a - b).abs().max().item() for a, b in zip(out.logits, ref.logits)) < 1e-4


def test_sliding_window_layers_stay_refused():
    sliding = tiny_model("qwen3", layers=2)
    text = sliding.config
    text.use_sliding_window, text.sliding_window, text.layer_types = True, 16, ["full_attention", "sliding_attention"]
    with pytest.raises(UnsupportedModelError, match="sliding-window"):
        FullKV().apply(sliding)
    text.layer_types = ["full_attention", "full_attention"]  # the flag alone, no sliding layer: full attention
    assert model_spec(sliding).num_layers == 2


# ----------------------------------------------------------------- prompts and spans
def consumed_visual_tokens(model, inputs) -> int:
    """Embeddings the model's own vision path produces for the prompt's images and video."""
    inner, total = model.model, 0
    with torch.no_grad():
        if model.config.model_type == "qwen3_vl":
            for pixels, grid in (("pixel_values", "image_grid_thw"), ("pixel_values_videos", "video_grid_thw")):
                if pixels in inputs:
                    total += sum(e.shape[0] for e in inner.get_image_features(inputs[pixels], inputs[grid]).pooler_output)
        elif model.config.model_type == "llava_onevision":
            if "pixel_values" in inputs:
                feats = inner.get_image_features(inputs["pixel_values"], inputs["image_sizes"],
                                                 batch_num_images=inputs["batch_num_images"]).pooler_output
                total += sum(f.shape[0] for f in feats)
            if "pixel_values_videos" in inputs:
                total += inner.get_video_features(inputs["pixel_values_videos"]).pooler_output.shape[1] + 1  # + newline
        else:
            feats = inner.get_image_features(inputs["pixel_values"]).pooler_output
            total += feats.shape[0] * feats.shape[1]
    return total


@pytest.mark.parametrize("model_type,kind", FAMILY_CASES, ids=IDS)
def test_spans_hold_what_the_model_consumes(model_type, kind):
    model, inputs = get_model(model_type), make_inputs(kind, model_type=model_type)
    ids = inputs["input_ids"]
    spans = find_spans(ids, ids.shape[1], model_spec(model), None)
    if model_type == "qwen3":
        assert spans.visual_tokens == 0 and spans.query_source == "window"
        return
    assert spans.visual_tokens == consumed_visual_tokens(model, inputs) > 0
    assert torch.equal(spans.context, spans.visual)
    last_visual = int(spans.visual.nonzero().max())
    assert spans.query_start == last_visual + 1 and spans.query_source == "after_visual"
    # the text-prior queries are text only: the question (and an end-of-vision marker)
    assert spans.query_len == 12 + (model_type != "llava_onevision")


def test_qwen3_vl_video_is_one_run_per_temporal_patch_with_a_timestamp():
    config = get_model("qwen3_vl").config
    inputs = qwen3_vl_inputs(config, images=0, video_frames=6, grid=8, timestamp_tokens=3, question=5)
    ids = inputs["input_ids"][0]
    starts = (ids == config.vision_start_token_id).nonzero().flatten()
    assert len(starts) == 3 and inputs["video_grid_thw"].tolist() == [[3, 8, 8]]
    assert all(bool((ids[s + 1 : s + 17] == config.video_token_id).all()) for s in starts.tolist())
    assert (starts[1:] - starts[:-1]).tolist() == [16 + 2 + 3] * 2  # run + start/end + timestamp


def test_llava_onevision_anyres_tiles_and_newlines():
    config = get_model("llava_onevision").config
    inputs = llava_onevision_inputs(config, image_sizes=((60, 100),))
    # best pinpoint 112x112: 2x2 tiles of 4x4 features (8x8), cropped to the 60:100 aspect
    # (int(8 * 60 / 100) = 4 rows of 8), a newline per row, plus the 16 base features
    assert int((inputs["input_ids"] == config.image_token_index).sum()) == 16 + 4 * 8 + 4
    assert inputs["pixel_values"].shape == (1, 5, 3, 56, 56)
    multi = llava_onevision_inputs(config, image_sizes=((60, 100), (56, 56)))
    assert int((multi["input_ids"] == config.image_token_index).sum()) == 2 * (16 + 1)
    assert multi["pixel_values"].shape == (2, 1, 3, 56, 56)


def test_prompt_shapes_match_the_real_image_processors():
    """The slow image processors (no torchvision, no hub) configured like the tiny towers give
    the pixel shapes and the metadata the prompt builders produce."""
    from transformers import GotOcr2ImageProcessor, LlavaOnevisionImageProcessor, Qwen2VLImageProcessor

    def image(h, w):
        return np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)

    llava = get_model("llava_onevision").config
    processor = LlavaOnevisionImageProcessor(size={"height": 56, "width": 56}, image_grid_pinpoints=llava.image_grid_pinpoints)
    real = processor([image(60, 100)], return_tensors="pt")
    ours = llava_onevision_inputs(llava, image_sizes=((60, 100),))
    assert real["pixel_values"].shape == ours["pixel_values"].shape
    assert torch.equal(real["image_sizes"], ours["image_sizes"])
    real = processor([[image(60, 100), image(56, 56), image(80, 40)]], return_tensors="pt")
    ours = llava_onevision_inputs(llava, image_sizes=((60, 100), (56, 56), (80, 40)))
    assert real["pixel_values"].shape == ours["pixel_values"].shape
    assert real["batch_num_images"].tolist() == ours["batch_num_images"].tolist() == [3]

    internvl = get_model("internvl").config
    processor = GotOcr2ImageProcessor(size={"height": 168, "width": 168}, crop_to_patches=True, max_patches=6)
    for h, w in ((100, 220), (168, 168), (300, 90)):
        real = processor([image(h, w)], return_tensors="pt")
        assert int(real["num_patches"][0]) == internvl_image_tiles(internvl, h, w, 6)
        ours = internvl_inputs(internvl, image_sizes=((h, w),))
        assert real["pixel_values"].shape == ours["pixel_values"].shape

    qwen3 = get_model("qwen3_vl").config
    processor = Qwen2VLImageProcessor(patch_size=16, temporal_patch_size=2, merge_size=2,
                                      min_pixels=32 * 32, max_pixels=256 * 256)
    real = processor([image(192, 192)], return_tensors="pt")
    ours = qwen3_vl_inputs(qwen3, images=1, grid=12)
    assert real["image_grid_thw"].tolist() == ours["image_grid_thw"].tolist() == [[1, 12, 12]]
    assert real["pixel_values"].shape == ours["pixel_values"].shape


# ----------------------------------------------------------------- exactness beyond CASES
def mixed_inputs(model_type: str) -> dict:
    """Images and a video in one prompt (text only for Qwen3)."""
    config = get_model(model_type).config
    if model_type == "qwen3_vl":
        return qwen3_vl_inputs(config, images=2, grid=8, video_frames=4, seed=5)
    if model_type == "llava_onevision":
        return llava_onevision_inputs(config, image_sizes=((60, 100), (70, 50)), video_frames=4, seed=5)
    if model_type == "internvl":
        return internvl_inputs(config, image_sizes=((100, 220),), video_frames=3, seed=5)
    return text_inputs(150, seed=5)


@pytest.mark.parametrize("model_type", [*VISION_FAMILIES, "qwen3"])
@pytest.mark.parametrize("make_method", [FullKV, lambda: SnapKV(1.0), lambda: AdaKV(1.0)],
                         ids=["FullKV", "SnapKV-1.0", "AdaKV-1.0"])
def test_images_and_video_in_one_prompt_exact_at_full_budget(model_type, make_method):
    model, inputs = get_model(model_type), mixed_inputs(model_type)
    ref = generate(model, inputs)
    method = make_method()
    out = generate(model, inputs, method)
    assert torch.equal(out.sequences, ref.sequences)
    assert max((a - b).abs().max().item() for a, b in zip(out.logits, ref.logits)) < 1e-4
    visual = method.report.visual_tokens
    assert visual == (consumed_visual_tokens(model, inputs) if model_type != "qwen3" else 0)


@pytest.mark.parametrize("model_type", [*VISION_FAMILIES, "qwen3"])
def test_bf16_full_budget_gives_the_tokens_of_plain_bf16_generate(model_type):
    model = tiny_model(model_type, dtype=torch.bfloat16)
    inputs = mixed_inputs(model_type)
    inputs = {k: (v.to(torch.bfloat16) if v.is_floating_point() else v) for k, v in inputs.items()}
    ref = generate(model, inputs)
    for method in (FullKV(), SnapKV(1.0)):
        out = generate(model, inputs, method)
        assert torch.equal(out.sequences, ref.sequences), type(method).__name__
        assert max((a.float() - b.float()).abs().max().item() for a, b in zip(out.logits, ref.logits)) < 5e-2


# ----------------------------------------------------------------- every method, bytes
def every_method(model, inputs, query_tokens=None):
    profile = profile_heads(model, [dict(inputs)], decode_tokens=3, query_tokens=query_tokens)
    return [StreamingLLM(0.3), H2O(0.3), SnapKV(0.3, window_size=8), PyramidKV(0.3, window_size=8),
            AdaKV(0.3, window_size=8), SparseMM(0.3, profile=profile, window_size=8), Quest(0.3, page_size=8),
            HybridKV(0.3, profile=profile, chunk_size=4), HybridKV(0.3, chunk_size=4, store="host", threshold=1.1)]


def heavy_inputs(model_type: str, kind: str) -> dict:
    """Prompts whose visual tokens are >= 70% of the prompt, so that a 0.3 budget covers
    HybridKV's protected text (every prompt text token, sinks and the recent window)."""
    config = get_model(model_type).config
    if model_type == "qwen3_vl":
        shapes = {"image": dict(images=1, grid=20), "multi_image": dict(images=3, grid=12),
                  "video": dict(images=0, video_frames=8, grid=12)}
        return qwen3_vl_inputs(config, **shapes[kind], seed=3)
    if model_type == "llava_onevision":
        shapes = {"image": dict(image_sizes=((60, 100),)), "multi_image": dict(image_sizes=((56, 56),) * 4),
                  "video": dict(image_sizes=(), video_frames=16)}
        return llava_onevision_inputs(config, **shapes[kind], seed=3)
    if model_type == "internvl":
        shapes = {"image": dict(image_sizes=((100, 220),)), "multi_image": dict(image_sizes=((168, 168), (100, 220))),
                  "video": dict(image_sizes=(), video_frames=4)}
        return internvl_inputs(config, **shapes[kind], seed=3)
    return text_inputs(120, seed=3)


@pytest.mark.parametrize("model_type,kind", FAMILY_CASES, ids=IDS)
def test_every_method_runs_and_reports_the_bytes_it_holds(model_type, kind):
    model, inputs = get_model(model_type), heavy_inputs(model_type, kind)
    query = 12 if kind == "text" else None
    prompt_len = inputs["input_ids"].shape[1]
    for method in every_method(model, inputs, query):
        name = repr(method)[:40]
        out, report, _, walked = run_under(model, method, inputs, query_tokens=query, max_new_tokens=4)
        assert out.shape[1] == prompt_len + 4, name
        assert report.resident_kv_bytes + report.offloaded_kv_bytes == walked, name
        visual = int(torch.isin(inputs["input_ids"], torch.tensor(model_spec(model).visual_token_ids)).sum())
        assert report.prompt_tokens == prompt_len and report.visual_tokens == visual, name
        assert report.generated_tokens == 3, name
        if isinstance(method, HybridKV):
            assert {t for layer in report.head_types for t in layer} <= {"static", "dynamic"}, name
        if not isinstance(method, (Quest, HybridKV)):  # retrieval keeps pools beside the kept prefix
            assert walked < report.full_kv_bytes, name
            assert all(n < prompt_len for layer in report.head_budgets for n in layer), name


# ----------------------------------------------------------------- positions
@pytest.mark.parametrize("model_type,kind", [("qwen3_vl", "multi_image"), ("qwen3_vl", "video"),
                                             ("llava_onevision", "image"), ("internvl", "video"), ("qwen3", "text")])
def test_manual_decode_loop_continues_positions_under_compression(model_type, kind):
    """Outside generate() positions come from the cache's seen count (M-RoPE deltas for Qwen3-VL)."""
    model, inputs = get_model(model_type), make_inputs(kind, model_type=model_type)
    ref_tokens, ref_logits = manual_decode(model, inputs, 8)
    plain = generate(model, inputs)
    assert torch.equal(ref_tokens, plain.sequences[:, inputs["input_ids"].shape[1] :][:, :8])
    with FullKV().apply(model):
        tokens, logits = manual_decode(model, inputs, 8)
    assert torch.equal(tokens, ref_tokens)
    assert max((a - b).abs().max().item() for a, b in zip(logits, ref_logits)) < 1e-4
    method = SnapKV(0.3, window_size=8)
    compressed = generate(model, inputs, method)
    with method.apply(model):
        tokens, logits = manual_decode(model, inputs, 10)
    assert torch.equal(tokens, compressed.sequences[:, inputs["input_ids"].shape[1]:])
    assert max((a - b).abs().max().item() for a, b in zip(logits, compressed.logits)) < 1e-4


def test_qwen3_vl_rope_deltas_restored_by_the_harness():
    """capture_prefill keeps Qwen3-VL's M-RoPE offset; decode puts it back after another prompt's
    prefill overwrote it, giving the tokens of method.apply + generate()."""
    model = get_model("qwen3_vl")
    first, second = make_inputs("video", model_type="qwen3_vl"), make_inputs("multi_image", model_type="qwen3_vl")
    capture = capture_prefill(model, first)
    other = capture_prefill(model, second)
    assert capture.rope_deltas is not None and int(capture.rope_deltas) != int(other.rope_deltas)
    assert int(model.model.rope_deltas) == int(other.rope_deltas)  # the second prefill overwrote it
    method = AdaKV(0.3, window_size=8)
    with method.apply(model):
        ref = model.generate(**first, max_new_tokens=8, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)
    model.model.rope_deltas = other.rope_deltas
    shared = decode(model, method, capture, 8)
    assert torch.equal(shared.tokens, ref.sequences[0, first["input_ids"].shape[1]:])
    assert (shared.logits - torch.cat(ref.logits)).abs().max() < 1e-4
    # a tail fed after compression continues at the M-RoPE position: FullKV gives plain generate()
    tail = capture_prefill(model, first, tail_tokens=4)
    full = decode(model, FullKV(), tail, 8)
    plain = generate(model, first)
    assert torch.equal(full.tokens, plain.sequences[0, first["input_ids"].shape[1] :][:8])
    assert (full.logits - torch.cat(plain.logits)[:8]).abs().max() < 1e-4
    for model_type in ("llava_onevision", "internvl"):  # 1-D positions: nothing to restore
        assert capture_prefill(get_model(model_type), make_inputs("image", model_type=model_type)).rope_deltas is None


# ----------------------------------------------------------------- Qwen3-VL deepstack
def test_qwen3_vl_deepstack_features_reach_the_cached_keys_and_the_engine_keeps_them():
    """Deepstack adds visual features to the outputs of decoder layers 0 and 1 (prefill only):
    layer 1's cached keys at visual positions depend on them, and the engine's hook and
    attention (on the top model and the text decoder) leave that path alone: FullKV's cache
    holds the keys of the plain run, and the vision tower keeps its own attention."""
    model = get_model("qwen3_vl")
    inputs = make_inputs("image", model_type="qwen3_vl")
    visual = (inputs["input_ids"][0] == model.config.image_token_id)

    def layer_keys(deepstack=True):
        tower = model.model.visual
        saved = tower.deepstack_visual_indexes
        tower.deepstack_visual_indexes = saved if deepstack else []
        try:
            cache = DynamicCache()
            model(**inputs, past_key_values=cache, use_cache=True)
        finally:
            tower.deepstack_visual_indexes = saved
        return [layer.keys[0] for layer in cache.layers]

    plain, without = layer_keys(), layer_keys(deepstack=False)
    assert torch.equal(plain[0], without[0])  # layer 0's input precedes any deepstack feature
    assert (plain[1][:, visual] - without[1][:, visual]).abs().max() > 1e-3
    assert torch.equal(plain[1][:, ~visual], without[1][:, ~visual])

    with FullKV().apply(model) as engine:
        assert text_config(model)._attn_implementation == "hybridkv"
        assert model.config.vision_config._attn_implementation == "sdpa"
        model.generate(**inputs, max_new_tokens=2, do_sample=False)
        for idx, layer in enumerate(engine.layers):
            length = plain[idx].shape[1]
            assert layer.kept_positions[0, :, :length].tolist() == [list(range(length))] * layer.kv_heads
            assert (layer.keys[0, :, :length] - plain[idx]).abs().max() < 1e-5  # the plain run's keys, in order
