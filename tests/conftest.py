"""Shared fixtures: tiny random models of every supported architecture and their prompts."""

import os

# The suite is offline: nothing may reach a model hub (the harness tests load local datasets).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from hybridkv.models.tiny import family_inputs, text_inputs, tiny_model, visual_inputs  # noqa: E402

torch.set_num_threads(1)  # tiny models gain nothing from more; shared cores lose a lot

# (model_type, input kind) pairs every invariant is checked on.
CASES = [
    ("qwen2_5_vl", "image"),
    ("qwen2_5_vl", "multi_image"),
    ("qwen2_5_vl", "video"),
    ("qwen2_vl", "image"),
    ("qwen2_vl", "multi_image"),
    ("qwen2_vl", "video"),
    ("qwen3_vl", "image"),
    ("qwen3_vl", "multi_image"),
    ("qwen3_vl", "video"),
    ("llava_onevision", "image"),
    ("llava_onevision", "multi_image"),
    ("llava_onevision", "video"),
    ("internvl", "image"),
    ("internvl", "multi_image"),
    ("internvl", "video"),
    ("qwen2", "text"),
    ("qwen3", "text"),
    ("llama", "text"),
]
FAMILY_PROMPTS = ("qwen3_vl", "llava_onevision", "internvl")
"""Families whose prompts are built from the model's config (``family_inputs``)."""


def make_inputs(kind: str, seed: int = 0, model_type: str | None = None) -> dict:
    """Prompt of the given kind for the tiny models (about 50-180 tokens); the Qwen2.5-VL /
    Qwen2-VL layout unless ``model_type`` is one of :data:`FAMILY_PROMPTS`."""
    if model_type in FAMILY_PROMPTS:
        return family_inputs(get_model(model_type).config, kind, seed=seed)
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
    return get_model(model_type), make_inputs(kind, model_type=model_type), model_type, kind


def walked_bytes(obj) -> int:
    """Bytes of every distinct tensor storage an object (a cache layer, its retriever) holds:
    the test's own walk over its attributes."""
    storages = {}
    for value in vars(obj).values():
        if isinstance(value, torch.Tensor):
            storages[value.untyped_storage().data_ptr()] = value.untyped_storage().nbytes()
    return sum(storages.values())


def cache_bytes(layers) -> int:
    """Bytes held by compressed layers and their chunk pools."""
    return sum(walked_bytes(layer) + (walked_bytes(layer.retriever) if layer.retriever else 0) for layer in layers)


def kept_positions(layers) -> list:
    """Per layer, per sequence, per KV head: sorted positions the row keeps in its kept region."""
    out = []
    for layer in layers:
        rows = []
        for b in range(layer.batch):
            rows.append([sorted(p for p in layer.kept_positions[b, h].tolist() if p >= 0) for h in range(layer.kv_heads)])
        out.append(rows)
    return out


def run_under(model, method, inputs, query_tokens=None, **kwargs):
    """``generate()`` under ``method``; (output, report, kept positions, bytes walked) read inside the block."""
    kwargs = {"max_new_tokens": 2, "do_sample": False, **kwargs}
    with method.apply(model, query_tokens=query_tokens) as engine:
        out = model.generate(**inputs, **kwargs)
        kept, walked = kept_positions(engine.layers), cache_bytes(engine.layers)
        report = engine.report
    return out, report, kept, walked
