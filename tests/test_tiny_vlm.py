"""The bundled tiny Qwen2.5-VL model: offline loading, checksums, prompt layout, accuracy."""

import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from hybridkv.data import COLOURS, make_sample, make_split
from hybridkv.models.tiny_vlm import (
    ASSET_DIR,
    SPECIAL_TOKENS,
    AssetChecksumError,
    answer,
    build_inputs,
    load_tiny_vlm,
    verify_checksums,
)


@pytest.fixture(scope="module")
def bundled():
    torch.manual_seed(0)
    return load_tiny_vlm()


def test_special_token_ids_are_in_the_config(bundled) -> None:
    model, tok, _ = bundled
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    assert len(set(ids.values())) == len(SPECIAL_TOKENS) and tok.unk_token_id not in list(ids.values())[1:]
    assert model.config.image_token_id == ids["<|image_pad|>"]
    assert model.config.video_token_id == ids["<|video_pad|>"]
    assert model.config.vision_start_token_id == ids["<|vision_start|>"]
    assert model.config.vision_end_token_id == ids["<|vision_end|>"]
    assert model.generation_config.eos_token_id == ids["<|im_end|>"]
    assert model.generation_config.pad_token_id == ids["<|endoftext|>"] == tok.pad_token_id
    assert model.config.vision_config.out_hidden_size == model.config.text_config.hidden_size
    assert next(model.parameters()).dtype == torch.float32


def test_prompt_layout(bundled) -> None:
    model, tok, proc = bundled
    sample = make_sample("cell_colour", 5)
    inputs = build_inputs(tok, proc, sample.images(), sample.question)
    assert inputs["image_grid_thw"].tolist() == [[1, 12, 12]]
    assert inputs["pixel_values"].shape == (144, 1176)
    ids = inputs["input_ids"][0]
    assert int((ids == model.config.image_token_id).sum()) == 36
    text = tok.decode(ids)
    assert text.replace(" ", "") == (
        "<|im_start|>user\n<|vision_start|>"
        + "<|image_pad|>" * 36
        + "<|vision_end|>"
        + sample.question.replace(" ", "")
        + "<|im_end|>\n<|im_start|>assistant\n"
    )
    assert tok.unk_token_id not in ids.tolist()

    needle = make_sample("needle", 5, num_images=3)
    short = make_sample("cell_shape", 6)
    batch = build_inputs(tok, proc, [needle.images(), short.images()], [needle.question, short.question])
    assert batch["image_grid_thw"].shape == (4, 3)
    assert int((batch["input_ids"][0] == model.config.vision_start_token_id).sum()) == 3
    assert batch["attention_mask"][1, 0] == 0 and batch["attention_mask"][:, -1].all()  # left padding


def test_checksums_guard_the_assets(tmp_path: Path) -> None:
    verify_checksums(ASSET_DIR)
    copy = tmp_path / "tiny_vlm"
    shutil.copytree(ASSET_DIR, copy)
    weights = copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(AssetChecksumError, match="sha256"):
        load_tiny_vlm(copy)
    (copy / "config.json").unlink()
    with pytest.raises(AssetChecksumError, match="missing"):
        verify_checksums(copy)
    (copy / "checksums.sha256").unlink()
    with pytest.raises(AssetChecksumError, match="checksums.sha256"):
        load_tiny_vlm(copy)


def test_answers_single_image_test_questions_with_plain_generate(bundled) -> None:
    model, tok, proc = bundled
    samples = make_split("test", "cell_colour", 4) + make_split("test", "cell_shape", 4)
    for sample in samples:
        inputs = build_inputs(tok, proc, sample.images(), sample.question)
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        new = out[0, inputs["input_ids"].shape[1] :]
        assert new[-1] == tok.convert_tokens_to_ids("<|im_end|>")
        assert tok.decode(new, skip_special_tokens=True).strip() == sample.answer, sample.question


def test_answer_follows_the_named_cell(bundled) -> None:
    """Repainting the named cell changes the answer; repainting every other cell does not."""
    model, tok, proc = bundled
    names = sorted(COLOURS)
    for sample in make_split("test", "cell_colour", 4, offset=100):
        (scene,) = sample.scenes
        _, row, col = sample.target
        new = names[(names.index(sample.answer) + 1) % len(names)]
        target_repainted = replace(
            scene,
            items=tuple(
                replace(it, colour=new, rgb=COLOURS[new]) if (it.row, it.col) == (row, col) else it
                for it in scene.items
            ),
        )
        others_repainted = replace(
            scene,
            items=tuple(
                it
                if (it.row, it.col) == (row, col)
                else replace(it, rgb=COLOURS[names[(names.index(it.colour) + 1) % 4]])
                for it in scene.items
            ),
        )
        assert answer(model, tok, proc, [target_repainted.render()], sample.question) == new
        assert answer(model, tok, proc, [others_repainted.render()], sample.question) == sample.answer


def test_multi_image_needle_prompt_runs(bundled) -> None:
    model, tok, proc = bundled
    sample = make_sample("needle", 11, num_images=16)
    inputs = build_inputs(tok, proc, sample.images(), sample.question)
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == 576
    assert answer(model, tok, proc, sample.images(), sample.question) in COLOURS


@pytest.mark.parametrize("protocol", ["answer-after", "question-after"])
def test_visual_eval_protocols_feed_the_right_tail(bundled, protocol) -> None:
    """answer-after compresses images + question and feeds the assistant header; question-after
    compresses the images only (the prefix ends at the last <|vision_end|>)."""
    from hybridkv.data.visual_eval import visual_tasks

    _, tok, processor = bundled
    for task in visual_tasks(tok, processor, ["cell_colour", "needle"], 1, num_images=[4], protocol=protocol):
        tokens = tok.convert_ids_to_tokens(task.inputs()["input_ids"][0].tolist())
        prefix, tail = tokens[: -task.tail_tokens], tokens[-task.tail_tokens:]
        if protocol == "answer-after":
            assert tail == ["<|im_start|>", "assistant", "\n"] and prefix[-2:] == ["<|im_end|>", "\n"]
        else:
            assert prefix[-1] == "<|vision_end|>" and "<|image_pad|>" not in tail
            assert tail[: len(task.sample.question.split())] == task.sample.question.split()
        assert task.key.endswith(protocol) and task.kind in ("cell_colour", "needle-4")
