"""coder-vlm without its 1.5B decoder: boards, patch captions, prompts, and that the trained vision
path is the model's own vision path (same names, same features). The real model: tests/test_pretrained.py."""

import pytest
import torch
from safetensors.torch import load_file
from transformers import LlavaOnevisionForConditionalGeneration, Qwen2Config

from hybridkv.data.visual_eval import tail_length, visual_tasks
from hybridkv.data.visual_tasks import COLUMN_NAMES, make_sample
from hybridkv.models import coder_vlm
from hybridkv.models.tiny_vlm import build_tokenizer
from hybridkv.models.visual_models import VISUAL_MODELS, visual_model

SMALL = coder_vlm.VisionSize(hidden=32, intermediate=64, layers=1, heads=2)


def tiny_model(seed: int = 0) -> tuple[LlavaOnevisionForConditionalGeneration, coder_vlm.VisionPath]:
    """coder-vlm's architecture around a random 2-layer decoder whose vocabulary holds the tiny VLM
    tokenizer's ids (so its prompts run), with a random vision path loaded the way load_coder_vlm does."""
    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    text = Qwen2Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    config = coder_vlm.coder_vlm_config(text, SMALL, tokenizer.convert_tokens_to_ids(coder_vlm.IMAGE_PAD),
                                        tokenizer.convert_tokens_to_ids(coder_vlm.VIDEO_PAD))
    model = LlavaOnevisionForConditionalGeneration(config).eval()
    path = coder_vlm.VisionPath(config).eval()
    missing, unexpected = model.model.load_state_dict(path.state_dict(), strict=False)
    assert not unexpected and not any(k.startswith(("vision_tower", "multi_modal_projector", "image_newline")) for k in missing)
    return model, path


def test_boards_align_with_patches():
    config = coder_vlm.TASK_CONFIG
    cell = config.image_size // config.grid
    assert cell * config.grid == config.image_size and cell % coder_vlm.PATCH == 0 and cell // coder_vlm.PATCH == 4
    sample = make_sample("needle", 7, config, num_images=32)
    assert len(sample.scenes) == 32 and sample.images()[0].size == (224, 224)
    assert sum(scene.count(shape="star") for scene in sample.scenes) == 1


def test_patch_words_spell_each_cell():
    scene = make_sample("needle", 3, coder_vlm.TASK_CONFIG, num_images=1).scenes[0]
    words = coder_vlm.patch_words(scene)
    assert len(words) == 256
    grid = [words[i * 16 : (i + 1) * 16] for i in range(16)]
    for r in range(4):
        for c in range(4):
            block = [row[4 * c : 4 * c + 4] for row in grid[4 * r : 4 * r + 4]]
            item = scene.item_at(r, c)
            what = [f" {item.shape}", f" {item.colour}"] if item else [" empty", coder_vlm.FILLER]
            assert block[0] == [f" {COLUMN_NAMES[c]}", str(r + 1), *what]
            assert all(row == [coder_vlm.FILLER] * 4 for row in block[1:])
    with pytest.raises(ValueError, match="4x4 boards"):
        coder_vlm.patch_words(make_sample("needle", 3).scenes[0])


def test_prompts_and_the_vision_path_are_the_models_own():
    """Placeholders per image are what LLaVA-OneVision packs (257 per image of a multi-image prompt,
    528 for one image, anyres); the prompt runs through the model; the training forward equals the
    model's image features; tails are found per protocol."""
    model, path = tiny_model()
    tokenizer, processor = build_tokenizer(), coder_vlm.build_image_processor()
    pad = tokenizer.convert_tokens_to_ids(coder_vlm.IMAGE_PAD)
    sample = make_sample("needle", 5, coder_vlm.TASK_CONFIG, num_images=3)
    inputs = coder_vlm.build_inputs(tokenizer, processor, sample.images(), sample.question, model.config)
    assert int((inputs["input_ids"] == pad).sum()) == 3 * 257 and inputs["batch_num_images"].tolist() == [3]
    single = coder_vlm.build_inputs(tokenizer, processor, sample.images()[:1], sample.question, model.config)
    assert int((single["input_ids"] == pad).sum()) == 528
    with torch.no_grad():
        for prompt in (inputs, single):
            model.generate(**prompt, max_new_tokens=2, do_sample=False)  # placeholder count = features, or it raises
        features = model.model.get_image_features(inputs["pixel_values"], inputs["image_sizes"],
                                                  batch_num_images=inputs["batch_num_images"]).pooler_output
        ours = path(inputs["pixel_values"][:, 0])
    torch.testing.assert_close(torch.stack([f[:256] for f in features]), ours)
    assert all(torch.equal(f[256], path.image_newline.detach()) for f in features)
    ids = inputs["input_ids"]
    after_images = ids.shape[1] - 1 - int((ids[0] == pad).nonzero().max())
    assert tail_length(tokenizer, ids, "question-after", coder_vlm.IMAGE_PAD) == after_images
    assert tail_length(tokenizer, ids, "answer-after", coder_vlm.IMAGE_PAD) == 3


def test_visual_tasks_use_the_models_boards():
    tokenizer, processor = build_tokenizer(), coder_vlm.build_image_processor()
    tasks = visual_tasks(tokenizer, processor, ["needle"], 1, num_images=[8], model="coder-vlm")
    assert tasks[0].length == 8 * 257 and tasks[0].sample.scenes[0].grid == 4
    assert visual_tasks(tokenizer, processor, ["needle"], 1, num_images=[8], model="coder-vlm",
                        protocol="question-after")[0].tail_tokens > 3
    assert set(VISUAL_MODELS) == {"tiny-vlm", "coder-vlm"}
    with pytest.raises(ValueError, match="tiny-vlm or coder-vlm"):
        visual_model("smollm2-135m")


def test_saved_vision_path_round_trips(tmp_path):
    _, path = tiny_model(1)
    coder_vlm.save_vision(path, SMALL, tmp_path, {"note": "test"})
    assert coder_vlm.vision_size(tmp_path) == SMALL
    loaded = coder_vlm.VisionPath(tiny_model()[0].config)
    loaded.load_state_dict(load_file(tmp_path / coder_vlm.WEIGHTS_FILE))
    for (name, a), b in zip(path.state_dict().items(), loaded.state_dict().values()):
        torch.testing.assert_close(a.half().float(), b, msg=name)


# --------------------------------------------------------------------------- the real model (slow)


@pytest.fixture(scope="module")
def real():
    return coder_vlm.load_coder_vlm(torch.bfloat16)


def _answer(model, tokenizer, processor, scenes, question) -> str:
    inputs = coder_vlm.build_inputs(tokenizer, processor, [s.render() for s in scenes], question, model.config)
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    words = tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).split()
    return words[0].lower().rstrip(".,") if words else ""


@pytest.mark.slow
def test_real_decoder_answers_test_needles_and_follows_the_named_image(real):
    """Offline, the full cache answers test-split needles among 8 images; repainting the star changes
    the answer to the new colour, repainting every other shape does not change it."""
    import dataclasses

    from hybridkv.data.visual_tasks import COLOURS, Scene, make_split

    model, tokenizer, processor = real
    samples = make_split("test", "needle", 8, coder_vlm.TASK_CONFIG, num_images=8)
    answers = [_answer(model, tokenizer, processor, s.scenes, s.question) for s in samples]
    assert sum(a == s.answer for a, s in zip(answers, samples)) >= 7, answers

    def repaint(scene: Scene, keep_star: bool, colour=None) -> Scene:
        items = []
        for item in scene.items:
            if (item.shape == "star") != keep_star:
                new = colour or next(c for c in sorted(COLOURS) if c != item.colour)
                item = dataclasses.replace(item, colour=new, rgb=COLOURS[new])
            items.append(item)
        return Scene(scene.grid, scene.image_size, tuple(items))

    for sample in samples[:3]:
        index = sample.target[0]
        other = next(c for c in sorted(COLOURS) if c != sample.answer)
        star_repainted = [repaint(s, keep_star=False, colour=other) if i == index else s for i, s in enumerate(sample.scenes)]
        assert _answer(model, tokenizer, processor, star_repainted, sample.question) == other
        rest_repainted = [repaint(s, keep_star=True) for s in sample.scenes]
        assert _answer(model, tokenizer, processor, rest_repainted, sample.question) == sample.answer


@pytest.mark.slow
def test_real_decoder_exact_at_budget_one(real):
    from hybridkv import HybridKV

    model, tokenizer, processor = real
    sample = make_sample("needle", 200_000_001, coder_vlm.TASK_CONFIG, num_images=8)
    inputs = coder_vlm.build_inputs(tokenizer, processor, sample.images(), sample.question, model.config)
    with torch.inference_mode():
        plain = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        method = HybridKV(1.0)
        with method.apply(model):
            ours = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert ours.tolist() == plain.tolist()
    assert method.report.visual_tokens == 8 * 257


def test_a_note_changes_only_the_text_after_the_images():
    """scripts/prompt_wording.py feeds other notes on one prefill of the images: the tokens up to the
    last image placeholder must not depend on the note, and the note must reach the prompt."""
    tokenizer, processor = build_tokenizer(), coder_vlm.build_image_processor()
    sample = make_sample("needle", 5, coder_vlm.TASK_CONFIG, num_images=2)
    bundled = coder_vlm.build_inputs(tokenizer, processor, sample.images(), sample.question)["input_ids"]
    other = coder_vlm.build_inputs(tokenizer, processor, sample.images(), sample.question, note="one star")["input_ids"]
    end = int((bundled[0] == tokenizer.convert_tokens_to_ids(coder_vlm.IMAGE_PAD)).nonzero().max()) + 1
    assert torch.equal(bundled[:, :end], other[:, :end]) and not torch.equal(bundled, other)
    text = coder_vlm.prompt_text("What colour is the star?", [257, 257], note="one star")
    assert f"{coder_vlm.IMAGE_PAD}one star What colour is the star?" in text
    assert f"{coder_vlm.IMAGE_PAD}What colour is the star?" in coder_vlm.prompt_text("What colour is the star?", [257, 257])
