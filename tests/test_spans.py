"""Visual token spans and text-prior query spans."""

import pytest
import torch
from conftest import get_model

from hybridkv.models.architectures import model_spec
from hybridkv.models.tiny import IMAGE_PAD, VIDEO_PAD, text_inputs, visual_inputs
from hybridkv.spans import DEFAULT_QUERY_WINDOW, find_spans


def test_visual_tokens_and_query_after_last_visual():
    spec = model_spec(get_model("qwen2_5_vl"))
    inputs = visual_inputs(images=2, grid=8, video_frames=2, question=9)
    ids = inputs["input_ids"]
    spans = find_spans(ids, ids.shape[1], spec, None)
    assert spans.visual_tokens == int(((ids == IMAGE_PAD) | (ids == VIDEO_PAD)).sum()) == 2 * 16 + 16
    assert spans.query_source == "after_visual"
    assert spans.query_len == 9 + 1  # the question and <vision_end>
    assert torch.equal(spans.context, spans.visual)


def test_text_query_tokens_explicit():
    spec = model_spec(get_model("llama"))
    spans = find_spans(text_inputs(100)["input_ids"], 100, spec, 12)
    assert (spans.query_start, spans.query_source, spans.visual_tokens) == (88, "query_tokens", 0)
    assert int(spans.context.sum()) == 88


def test_text_last_user_turn():
    model = get_model("llama")
    spec = model_spec(model)
    end = 7
    object.__setattr__(spec, "turn_end_ids", (end,))
    ids = torch.randint(10, 100, (1, 120))
    ids[0, 90] = end  # end of the context turn
    ids[0, 112] = end  # end of the question turn
    spans = find_spans(ids, 120, spec, None)
    assert (spans.query_start, spans.query_source) == (91, "user_turn")


def test_text_without_markers_uses_window():
    spec = model_spec(get_model("qwen2"))
    spans = find_spans(text_inputs(100)["input_ids"], 100, spec, None)
    assert spans.query_source == "window" and spans.query_len == DEFAULT_QUERY_WINDOW


def test_images_without_a_question_have_no_text_prior():
    spec = model_spec(get_model("qwen2_5_vl"))
    for inputs in (visual_inputs(images=2, grid=8, question=0),  # only <vision_end> after the images
                   {"input_ids": visual_inputs(images=2, grid=8, question=0)["input_ids"][:, :-1]}):  # nothing
        ids = inputs["input_ids"]
        spans = find_spans(ids, ids.shape[1], spec, None)
        assert spans.query_source == "none" and spans.query_len == DEFAULT_QUERY_WINDOW
        assert torch.equal(spans.context, spans.visual)
    ids = visual_inputs(images=2, grid=8, question=1)["input_ids"]  # one word and <vision_end>: a question
    assert find_spans(ids, ids.shape[1], spec, None).query_source == "after_visual"


def test_query_tokens_zero_says_the_prompt_holds_no_question():
    spec = model_spec(get_model("qwen2"))
    spans = find_spans(text_inputs(100)["input_ids"], 100, spec, 0)
    assert spans.query_source == "none" and spans.query_len == DEFAULT_QUERY_WINDOW
    assert int(spans.context.sum()) == 100 - DEFAULT_QUERY_WINDOW
    with pytest.raises(ValueError, match="between 0 and the prompt length"):
        find_spans(text_inputs(100)["input_ids"], 100, spec, -1)
