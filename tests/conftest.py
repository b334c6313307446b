"""Shared fixtures: tiny random models of every supported architecture and their prompts."""

import pytest
import torch

from hybridkv.models.tiny import text_inputs, tiny_model, visual_inputs

torch.set_num_threads(1)  # tiny models gain nothing from more; shared cores lose a lot

# (model_type, input kind) pairs every invariant is checked on.
CASES = [
    ("qwen2_5_vl", "image"),
    ("qwen2_5_vl", "multi_image"),
    ("qwen2_5_vl", "video"),
    ("qwen2_vl", "image"),
    ("qwen2_vl", "multi_image"),
    ("qwen2_vl", "video"),
    ("qwen2", "text"),
    ("llama", "text"),
]


def make_inputs(kind: str, seed: int = 0) -> dict:
    """Prompt of the given kind for the tiny models (about 70-150 tokens)."""
    if kind == "image":
        return visual_inputs(images=1, grid=12, seed=seed)
    if kind == "multi_image":
        return visual_inputs(images=3, grid=8, seed=seed)
    if kind == "video":
        return visual_inputs(images=0, video_frames=4, grid=8, seed=seed)
    return text_inputs(120, seed=seed)


_MODELS: dict = {}


def get_model(model_type: str):
    """One tiny model per architecture for the whole session (eval mode, fp32)."""
    if model_type not in _MODELS:
        _MODELS[model_type] = tiny_model(model_type)
    return _MODELS[model_type]


@pytest.fixture(params=CASES, ids=[f"{m}-{k}" for m, k in CASES])
def case(request):
    """(model, inputs, model_type, kind) for each supported architecture and input kind."""
    model_type, kind = request.param
    return get_model(model_type), make_inputs(kind), model_type, kind
