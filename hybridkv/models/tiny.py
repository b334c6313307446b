"""Tiny random-weight models of every supported architecture, and prompts for them.

Built from each family's transformers config class (no download), for architecture tests and
engine benchmarks. Prompts are shaped as the family's processor shapes them (placeholder runs
of the length the model consumes, pixel tensors of the right shapes) without the hub and
without torchvision; ``tests/test_families.py`` checks the shapes against the real (slow) image
processors and the counts against what the models consume.

Vocabularies: Qwen2.5-VL / Qwen2-VL / Qwen2 / Llama default to :data:`VOCAB`, which holds the
real Qwen vision ids (151652–151656) so that prompts look like real Qwen2.5-VL prompts. The
families added later (Qwen3-VL, LLaVA-OneVision, InternVL, Qwen3) default to the small
:data:`FAMILY_VOCAB`, whose last ids play the special tokens (see :func:`special_ids`); with a
vocabulary large enough the real ids are used.
"""

from __future__ import annotations

import math

import torch
from transformers import (
    InternVLConfig,
    InternVLForConditionalGeneration,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen3Config,
    Qwen3ForCausalLM,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
)
from transformers.image_processing_utils import select_best_resolution
from transformers.models.got_ocr2.image_processing_got_ocr2 import get_optimal_tiled_canvas

VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD = 151652, 151653, 151655, 151656
VOCAB = 151660  # covers the vision ids; text prompts draw from the first TEXT_IDS ids
FAMILY_VOCAB = 2048  # default vocabulary of the SMALL_VOCAB_TYPES
SMALL_VOCAB_TYPES = ("qwen3_vl", "llava_onevision", "internvl", "qwen3")
TEXT_IDS = 1000
PATCH, TEMPORAL_PATCH, MERGE = 14, 2, 2
TINY_ARCHITECTURES = ("qwen2_5_vl", "qwen2_vl", "qwen3_vl", "llava_onevision", "internvl", "qwen2", "qwen3", "llama")

REAL_SPECIAL_IDS: dict[str, dict[str, int]] = {
    "qwen3_vl": {"vision_start": VISION_START, "vision_end": VISION_END, "image": IMAGE_PAD, "video": VIDEO_PAD},
    "llava_onevision": {"image": 151646, "video": 151647},  # <image>, <video> of the Qwen2 tokenizer
    "internvl": {"image_start": 151665, "image_end": 151666, "image": 151667},  # <img>, </img>, <IMG_CONTEXT>
}
"""The ids the released checkpoints' tokenizers give each family's special tokens."""

# Tiny vision towers: Qwen3-VL patches of 16 px (a 8x8 table of learned position embeddings,
# interpolated); LLaVA-OneVision SigLIP tiles of 56 px (16 patches of 14 px), anyres over up to
# 3x3 tiles; InternVL tiles of 168 px (144 patches of 14 px, pixel-shuffled to 36 tokens).
QWEN3_PATCH = 16
LLAVA_TILE, LLAVA_PATCH = 56, 14
LLAVA_PINPOINTS = [[LLAVA_TILE * r, LLAVA_TILE * c] for r in (1, 2, 3) for c in (1, 2, 3)]
INTERNVL_TILE, INTERNVL_PATCH, INTERNVL_MAX_TILES = 168, 14, 6


def vision_ids(vocab_size: int = VOCAB) -> tuple[int, int, int, int]:
    """(vision_start, vision_end, image_pad, video_pad) ids: Qwen's real ids when the vocabulary
    holds them, else the last four ids of a smaller vocabulary (benchmarks use a small vocabulary
    so that the KV cache, not the output layer, dominates decoding)."""
    if vocab_size >= VOCAB:
        return VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD
    if vocab_size <= TEXT_IDS + 4:
        raise ValueError(f"vocab_size must exceed {TEXT_IDS + 4} (text ids + 4 vision ids), got {vocab_size}.")
    return vocab_size - 4, vocab_size - 3, vocab_size - 2, vocab_size - 1


def special_ids(model_type: str, vocab_size: int) -> dict[str, int]:
    """Special token ids of a tiny ``model_type`` model (a family of :data:`REAL_SPECIAL_IDS`):
    the real ids when ``vocab_size`` holds them, else the last ids of the vocabulary, in the
    order of :data:`REAL_SPECIAL_IDS`."""
    real = REAL_SPECIAL_IDS[model_type]
    if vocab_size > max(real.values()):
        return dict(real)
    if vocab_size <= TEXT_IDS + len(real):
        raise ValueError(f"vocab_size must exceed {TEXT_IDS + len(real)} (text ids + {len(real)} special ids), "
                         f"got {vocab_size}.")
    return {name: vocab_size - len(real) + i for i, name in enumerate(real)}


def tiny_model(
    model_type: str,
    *,
    hidden_size: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    vocab_size: int | None = None,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> torch.nn.Module:
    """A randomly initialised model of ``model_type`` in eval mode (sdpa attention).

    Args:
        model_type: one of :data:`TINY_ARCHITECTURES`.
        hidden_size / layers / heads / kv_heads: text decoder shape (head_dim = hidden/heads).
        vocab_size: text vocabulary; None: :data:`FAMILY_VOCAB` for the
            :data:`SMALL_VOCAB_TYPES`, else :data:`VOCAB` (see :func:`vision_ids` and
            :func:`special_ids` for the special token ids).
    """
    if model_type not in TINY_ARCHITECTURES:
        raise ValueError(f"no tiny builder for {model_type!r}; known: {TINY_ARCHITECTURES}")
    if vocab_size is None:
        vocab_size = FAMILY_VOCAB if model_type in SMALL_VOCAB_TYPES else VOCAB
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
    elif model_type == "qwen3_vl":
        config, cls = _qwen3_vl_config(text, vision, {**rope, "mrope_interleaved": True}), Qwen3VLForConditionalGeneration
    elif model_type == "llava_onevision":
        config, cls = _llava_onevision_config(text), LlavaOnevisionForConditionalGeneration
    elif model_type == "internvl":
        config, cls = _internvl_config(text), InternVLForConditionalGeneration
    elif model_type == "qwen2":
        config, cls = Qwen2Config(**text), Qwen2ForCausalLM
    elif model_type == "qwen3":
        config, cls = Qwen3Config(**text, head_dim=hidden_size // heads), Qwen3ForCausalLM
    else:
        config, cls = LlamaConfig(**text), LlamaForCausalLM
    config._attn_implementation = "sdpa"
    model = cls(config).to(dtype).eval()
    model.generation_config.eos_token_id = None  # random weights: never stop early
    model.generation_config.pad_token_id = 0
    return model


def _qwen3_vl_config(text: dict, vision: dict, rope: dict) -> Qwen3VLConfig:
    """Qwen3-VL: Qwen3 decoder (q/k norms, explicit head_dim), interleaved M-RoPE, and a
    2-block vision tower whose blocks 0 and 1 feed deepstack features into the outputs of
    decoder layers 0 and 1."""
    ids = special_ids("qwen3_vl", text["vocab_size"])
    head_dim = text["hidden_size"] // text["num_attention_heads"]
    vision = {**vision, "depth": 2, "intermediate_size": 64, "patch_size": QWEN3_PATCH,
              "num_position_embeddings": 64, "deepstack_visual_indexes": [0, 1]}
    return Qwen3VLConfig(
        text_config={**text, "head_dim": head_dim, "rope_parameters": rope}, vision_config=vision,
        image_token_id=ids["image"], video_token_id=ids["video"], vision_start_token_id=ids["vision_start"],
        vision_end_token_id=ids["vision_end"], tie_word_embeddings=True,
    )


def _llava_onevision_config(text: dict) -> LlavaOnevisionConfig:
    """LLaVA-OneVision: Qwen2 decoder (1-D positions) and a 1-layer SigLIP tower, anyres tiling."""
    ids = special_ids("llava_onevision", text["vocab_size"])
    vision = dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                  num_attention_heads=2, image_size=LLAVA_TILE, patch_size=LLAVA_PATCH)
    return LlavaOnevisionConfig(
        text_config={**text, "model_type": "qwen2"}, vision_config=vision, image_token_index=ids["image"],
        video_token_index=ids["video"], image_grid_pinpoints=LLAVA_PINPOINTS, vision_feature_select_strategy="full",
        vision_feature_layer=-1, vision_aspect_ratio="anyres_max_9", tie_word_embeddings=True,
    )


def _internvl_config(text: dict) -> InternVLConfig:
    """InternVL (3, Hugging Face format): Qwen2 decoder and a 1-layer InternViT, pixel shuffle 0.5."""
    ids = special_ids("internvl", text["vocab_size"])
    vision = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                  image_size=[INTERNVL_TILE, INTERNVL_TILE], patch_size=[INTERNVL_PATCH, INTERNVL_PATCH])
    per_tile = (INTERNVL_TILE // INTERNVL_PATCH) ** 2 // 4
    return InternVLConfig(
        text_config={**text, "model_type": "qwen2"}, vision_config=vision, image_token_id=ids["image"],
        image_seq_length=per_tile, downsample_ratio=0.5, vision_feature_select_strategy="default",
        tie_word_embeddings=True,
    )


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


def _text(gen: torch.Generator, n: int) -> torch.Tensor:
    return torch.randint(1, TEXT_IDS, (n,), generator=gen)


def _prompt(pieces: list[torch.Tensor], out: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    input_ids = torch.cat(pieces)[None]
    out["input_ids"] = input_ids
    out["attention_mask"] = torch.ones_like(input_ids)
    return out


def qwen3_vl_inputs(
    config,
    images: int = 1,
    grid: int = 8,
    video_frames: int = 0,
    text_before: int = 6,
    question: int = 12,
    timestamp_tokens: int = 3,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """A Qwen3-VL prompt of ``images`` random images (and optionally one video) plus text.

    Images as for Qwen2.5-VL (``<vision_start> <image_pad> x grid*grid/4 <vision_end>``). The
    video is written as Qwen3-VL's processor writes it: every temporal patch (2 frames) is its
    own run ``<t seconds> <vision_start> <video_pad> x grid*grid/4 <vision_end>``, the timestamp
    being ``timestamp_tokens`` text ids; ``video_grid_thw`` stays one row ``[t, grid, grid]``.

    Args:
        config: the model's ``Qwen3VLConfig`` (token ids, patch sizes).
        grid: patches per image side (even); video_frames: even number of frames (0: none).
    Returns:
        ``input_ids`` / ``attention_mask`` (1, L), ``pixel_values`` (patches, 3*2*16*16) and
        ``image_grid_thw`` (images, 3); ``pixel_values_videos`` / ``video_grid_thw`` with a video.
    """
    gen = torch.Generator().manual_seed(seed)
    vision = config.vision_config
    merge, temporal = vision.spatial_merge_size, vision.temporal_patch_size
    patch_dim = vision.in_channels * temporal * vision.patch_size**2
    per_frame = grid * grid // (merge * merge)
    start, end = config.vision_start_token_id, config.vision_end_token_id
    pieces, out = [_text(gen, text_before)], {}
    for _ in range(images):
        pieces.append(torch.tensor([start] + [config.image_token_id] * per_frame + [end]))
    if images:
        out["pixel_values"] = torch.randn(images * grid * grid, patch_dim, generator=gen)
        out["image_grid_thw"] = torch.tensor([[1, grid, grid]] * images)
    if video_frames:
        t = video_frames // temporal
        for _ in range(t):
            pieces.append(_text(gen, timestamp_tokens))
            pieces.append(torch.tensor([start] + [config.video_token_id] * per_frame + [end]))
        out["pixel_values_videos"] = torch.randn(t * grid * grid, patch_dim, generator=gen)
        out["video_grid_thw"] = torch.tensor([[t, grid, grid]])
    pieces.append(_text(gen, question))
    return _prompt(pieces, out)


def llava_onevision_image_tokens(config, height: int, width: int, alone: bool = True) -> tuple[int, int]:
    """(placeholder tokens, tiles) of one ``height`` x ``width`` image for LLaVA-OneVision.

    A single image (``alone``) is tiled "anyres": the base tile (side x side features) plus the
    grid of tiles of the best pinpoint resolution, whose feature map is cropped to the image's
    aspect ratio (padding removed), shrunk when it exceeds ``anyres_max_N`` base tiles, and
    given one newline token per row. Each image of a multi-image prompt is the base tile plus
    one newline token.
    """
    side = config.vision_config.image_size // config.vision_config.patch_size
    base = side * side
    if not alone:
        return base + 1, 1
    tile = config.vision_config.image_size
    best_h, best_w = select_best_resolution((height, width), config.image_grid_pinpoints)
    rows, cols = best_h // tile, best_w // tile
    cur_h, cur_w = rows * side, cols * side
    if width / height > cur_w / cur_h:  # wider than the grid: rows of padding above and below
        cur_h -= 2 * ((cur_h - int(round(height * cur_w / width, 7))) // 2)
    else:
        cur_w -= 2 * ((cur_w - int(round(width * cur_h / height, 7))) // 2)
    max_tiles = int(config.vision_aspect_ratio.removeprefix("anyres_max_"))
    ratio = math.sqrt(cur_h * cur_w / (max_tiles * base))
    if ratio > 1.1:
        cur_h, cur_w = int(cur_h // ratio), int(cur_w // ratio)
    return base + cur_h * cur_w + cur_h, 1 + rows * cols


def llava_onevision_inputs(
    config,
    image_sizes: tuple[tuple[int, int], ...] = ((60, 100),),
    video_frames: int = 0,
    text_before: int = 6,
    question: int = 12,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """A LLaVA-OneVision prompt: images of the given (height, width), optionally a video, text.

    Layout: ``text_before`` ids, each image's ``<image>`` run (see
    :func:`llava_onevision_image_tokens`), the video's ``<video>`` run (frames x ceil(side/2)^2
    pooled features + one newline), ``question`` ids. No start/end markers: the chat template
    puts a newline text token after each run, which the question's first id plays here.

    Returns:
        ``input_ids`` / ``attention_mask`` (1, L); with images ``pixel_values`` (images,
        tiles, 3, S, S) (zero-padded to the most tiles), ``image_sizes`` (images, 2) and
        ``batch_num_images`` (1,); with a video ``pixel_values_videos`` (1, frames, 3, S, S).
    """
    gen = torch.Generator().manual_seed(seed)
    size = config.vision_config.image_size
    pieces, out = [_text(gen, text_before)], {}
    alone = len(image_sizes) == 1
    counts = [llava_onevision_image_tokens(config, h, w, alone) for h, w in image_sizes]
    for tokens, _ in counts:
        pieces.append(torch.full((tokens,), config.image_token_id))
    if image_sizes:
        most = max(tiles for _, tiles in counts)
        pixels = torch.zeros(len(image_sizes), most, 3, size, size)
        for i, (_, tiles) in enumerate(counts):
            pixels[i, :tiles] = torch.randn(tiles, 3, size, size, generator=gen)
        out.update(pixel_values=pixels, image_sizes=torch.tensor(image_sizes),
                   batch_num_images=torch.tensor([len(image_sizes)]))
    if video_frames:
        pooled = math.ceil(config.vision_config.image_size // config.vision_config.patch_size / 2)
        pieces.append(torch.full((video_frames * pooled * pooled + 1,), config.video_token_id))
        out["pixel_values_videos"] = torch.randn(1, video_frames, 3, size, size, generator=gen)
    pieces.append(_text(gen, question))
    return _prompt(pieces, out)


def internvl_image_tiles(config, height: int, width: int, max_tiles: int = INTERNVL_MAX_TILES) -> int:
    """Tiles InternVL's image processor cuts a ``height`` x ``width`` image into: the grid of at
    most ``max_tiles`` tiles closest to its aspect ratio, plus a thumbnail when the grid has more
    than one tile."""
    tile = config.vision_config.image_size
    cols, rows = get_optimal_tiled_canvas((height, width), tuple(tile), 1, max_tiles)
    return 1 + cols * rows if cols * rows > 1 else 1


def internvl_tokens_per_tile(config) -> int:
    """Placeholder tokens per tile: the tile's patches after pixel shuffle."""
    patches = (config.vision_config.image_size[0] // config.vision_config.patch_size[0]) ** 2
    return int(patches * config.downsample_ratio**2)


def internvl_inputs(
    config,
    image_sizes: tuple[tuple[int, int], ...] = ((100, 220),),
    video_frames: int = 0,
    max_tiles: int = INTERNVL_MAX_TILES,
    text_before: int = 6,
    question: int = 12,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """An InternVL prompt: images of the given (height, width), optionally a video, then text.

    Each image is ``<img> <IMG_CONTEXT> x (tokens per tile x tiles) </img>`` (see
    :func:`internvl_image_tiles`); a video is, as InternVL's processor writes it, one single-tile
    image per frame, ``Frame{i}: <img> ... </img>`` joined by a newline (2 and 1 text ids here).

    Returns:
        ``input_ids`` / ``attention_mask`` (1, L) and ``pixel_values`` (tiles, 3, S, S), the
        tiles of the images then of the frames, in prompt order.
    """
    gen = torch.Generator().manual_seed(seed)
    ids = special_ids("internvl", config.get_text_config().vocab_size)
    size = config.vision_config.image_size
    per_tile = internvl_tokens_per_tile(config)
    pieces, tiles = [_text(gen, text_before)], 0

    def image(n_tiles: int) -> torch.Tensor:
        return torch.tensor([ids["image_start"]] + [config.image_token_id] * (per_tile * n_tiles) + [ids["image_end"]])

    for h, w in image_sizes:
        n = internvl_image_tiles(config, h, w, max_tiles)
        pieces.append(image(n))
        tiles += n
    for frame in range(video_frames):
        pieces.extend([_text(gen, 1)] * (frame > 0) + [_text(gen, 2), image(1)])
        tiles += 1
    pieces.append(_text(gen, question))
    return _prompt(pieces, {"pixel_values": torch.randn(tiles, 3, size[0], size[1], generator=gen)})


def family_inputs(config, kind: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """The test prompt of ``kind`` ("image", "multi_image", "video", "text") for a tiny model of
    a family added later (Qwen3-VL, LLaVA-OneVision, InternVL, Qwen3): 50-190 tokens."""
    if kind == "text":
        return text_inputs(120, seed=seed)
    model_type = config.model_type
    if model_type == "qwen3_vl":
        shapes = {"image": dict(images=1, grid=12), "multi_image": dict(images=3, grid=8),
                  "video": dict(images=0, video_frames=4, grid=8)}
        return qwen3_vl_inputs(config, **shapes[kind], seed=seed)
    if model_type == "llava_onevision":
        shapes = {"image": dict(image_sizes=((60, 100),)), "multi_image": dict(image_sizes=((56, 56),) * 3),
                  "video": dict(image_sizes=(), video_frames=8)}
        return llava_onevision_inputs(config, **shapes[kind], seed=seed)
    if model_type == "internvl":
        shapes = {"image": dict(image_sizes=((100, 220),)), "multi_image": dict(image_sizes=((168, 168), (100, 220))),
                  "video": dict(image_sizes=(), video_frames=4)}
        return internvl_inputs(config, **shapes[kind], seed=seed)
    raise ValueError(f"no {kind!r} prompt for model type {model_type!r}")
