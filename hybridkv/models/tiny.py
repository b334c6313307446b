"""Tiny random-weight models of every supported architecture, and prompts for them.

Built from configs (no download), for architecture tests and engine benchmarks. The vocabulary
is small except for the Qwen vision special ids, which keep their real values (151652–151656)
so that prompts look like real Qwen2.5-VL prompts.
"""

from __future__ import annotations

import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
)

VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD = 151652, 151653, 151655, 151656
VOCAB = 151660  # covers the vision ids; text prompts draw from the first TEXT_IDS ids
TEXT_IDS = 1000
PATCH, TEMPORAL_PATCH, MERGE = 14, 2, 2
TINY_ARCHITECTURES = ("qwen2_5_vl", "qwen2_vl", "qwen2", "llama")


def vision_ids(vocab_size: int = VOCAB) -> tuple[int, int, int, int]:
    """(vision_start, vision_end, image_pad, video_pad) ids: Qwen's real ids when the vocabulary
    holds them, else the last four ids of a smaller vocabulary (benchmarks use a small vocabulary
    so that the KV cache, not the output layer, dominates decoding)."""
    if vocab_size >= VOCAB:
        return VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD
    if vocab_size <= TEXT_IDS + 4:
        raise ValueError(f"vocab_size must exceed {TEXT_IDS + 4} (text ids + 4 vision ids), got {vocab_size}.")
    return vocab_size - 4, vocab_size - 3, vocab_size - 2, vocab_size - 1


def tiny_model(
    model_type: str,
    *,
    hidden_size: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    vocab_size: int = VOCAB,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> torch.nn.Module:
    """A randomly initialised model of ``model_type`` in eval mode (sdpa attention).

    Args:
        model_type: one of :data:`TINY_ARCHITECTURES`.
        hidden_size / layers / heads / kv_heads: text decoder shape (head_dim = hidden/heads).
        vocab_size: text vocabulary (see :func:`vision_ids` for the vision token ids).
    """
    torch.manual_seed(seed)
    text = dict(
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        vocab_size=vocab_size,
        max_position_embeddings=65536,
        tie_word_embeddings=True,
    )
    half = hidden_size // heads // 2
    mrope = [half - 2 * (half // 3), half // 3, half // 3]
    vision = dict(depth=1, hidden_size=32, num_heads=2, out_hidden_size=hidden_size, patch_size=PATCH,
                  spatial_merge_size=MERGE, temporal_patch_size=TEMPORAL_PATCH, in_channels=3)
    rope = {"rope_type": "default", "rope_theta": 1e6, "mrope_section": mrope}
    if model_type in ("qwen2_5_vl", "qwen2_vl"):
        start, end, image, video = vision_ids(vocab_size)
        tokens = dict(image_token_id=image, video_token_id=video, vision_start_token_id=start, vision_end_token_id=end)
    if model_type == "qwen2_5_vl":
        vision.update(intermediate_size=64, fullatt_block_indexes=[0], window_size=56)
        config = Qwen2_5_VLConfig(text_config={**text, "rope_parameters": rope}, vision_config=vision, **tokens)
        cls = Qwen2_5_VLForConditionalGeneration
    elif model_type == "qwen2_vl":
        vision.update(embed_dim=32, mlp_ratio=2)
        vision.pop("out_hidden_size")
        vision["hidden_size"] = hidden_size
        config = Qwen2VLConfig(text_config={**text, "rope_parameters": rope}, vision_config=vision, **tokens)
        cls = Qwen2VLForConditionalGeneration
    elif model_type == "qwen2":
        config, cls = Qwen2Config(**text), Qwen2ForCausalLM
    elif model_type == "llama":
        config, cls = LlamaConfig(**text), LlamaForCausalLM
    else:
        raise ValueError(f"no tiny builder for {model_type!r}; known: {TINY_ARCHITECTURES}")
    config._attn_implementation = "sdpa"
    model = cls(config).to(dtype).eval()
    model.generation_config.eos_token_id = None  # random weights: never stop early
    model.generation_config.pad_token_id = 0
    return model


def visual_inputs(
    images: int = 1,
    grid: int = 8,
    video_frames: int = 0,
    text_before: int = 6,
    question: int = 12,
    seed: int = 0,
    vocab_size: int = VOCAB,
) -> dict[str, torch.Tensor]:
    """A Qwen-VL style prompt of ``images`` random images (and optionally one video) plus text.

    Layout: ``text_before`` ids, then per image ``<vision_start> <image_pad> x n <vision_end>``,
    then the video likewise, then ``question`` text ids (the text-prior queries).

    Args:
        grid: patches per image side (even); each image gives grid*grid/4 visual tokens.
        video_frames: even number of frames of the video (0: none); grid*grid/4 tokens per 2 frames.
        vocab_size: the model's vocabulary (picks the vision ids, see :func:`vision_ids`).
    Returns:
        ``input_ids`` / ``attention_mask`` (1, L), ``pixel_values`` (patches, 1176) and
        ``image_grid_thw`` (images, 3); ``pixel_values_videos`` / ``video_grid_thw`` with a video.
    """
    gen = torch.Generator().manual_seed(seed)
    start, end, image, video = vision_ids(vocab_size)
    per_image = grid * grid // (MERGE * MERGE)
    ids = [torch.randint(1, TEXT_IDS, (text_before,), generator=gen)]
    out: dict[str, torch.Tensor] = {}
    patch_dim = 3 * TEMPORAL_PATCH * PATCH * PATCH
    for _ in range(images):
        ids.append(torch.tensor([start] + [image] * per_image + [end]))
    if images:
        out["pixel_values"] = torch.randn(images * grid * grid, patch_dim, generator=gen)
        out["image_grid_thw"] = torch.tensor([[1, grid, grid]] * images)
    if video_frames:
        t = video_frames // TEMPORAL_PATCH
        ids.append(torch.tensor([start] + [video] * (t * per_image) + [end]))
        out["pixel_values_videos"] = torch.randn(t * grid * grid, patch_dim, generator=gen)
        out["video_grid_thw"] = torch.tensor([[t, grid, grid]])
    ids.append(torch.randint(1, TEXT_IDS, (question,), generator=gen))
    input_ids = torch.cat(ids)[None]
    out["input_ids"] = input_ids
    out["attention_mask"] = torch.ones_like(input_ids)
    return out


def text_inputs(length: int = 200, seed: int = 0) -> dict[str, torch.Tensor]:
    """A random text prompt: ``input_ids`` / ``attention_mask`` (1, length)."""
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(1, TEXT_IDS, (1, length), generator=gen)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
