"""coder-vlm: Qwen2.5-Coder-1.5B's pretrained decoder, frozen, behind a vision path trained here.

The architecture is LLaVA-OneVision (``LlavaOnevisionForConditionalGeneration``): a SigLIP
vision tower, a two-layer projector and a Qwen2 decoder. The decoder is the real one the loader
fetches (:func:`hybridkv.models.load_pretrained`, 28 layers, 12 query heads, 2 KV heads); only
the vision tower, the projector and the image-newline vector are trained, by
``scripts/train_coder_vlm.py``, and bundled in ``hybridkv/assets/coder_vlm/`` (checksummed).

Why LLaVA-OneVision and not Qwen2.5-VL: LLaVA-OneVision's decoder gives visual tokens ordinary
consecutive 1-D positions, the positions the pretrained text decoder was trained on; Qwen2.5-VL's
M-RoPE would give them (time, row, column) positions this decoder has never seen.

How the vision path learns without a gradient through the decoder: every visual token is trained
to land on the decoder's word embedding of one token of the board's *patch caption*
(:func:`patch_words`), so the frozen decoder reads an image the way it reads that caption. A
board (:data:`TASK_CONFIG`) is 4 x 4 cells of 56 px on a 224 px image; SigLIP's 14 px patches
give 16 x 16 = 256 visual tokens, a 4 x 4 block per cell. The first patch row of a cell's block
spells ``<column letter> <row digit> <shape> <colour>`` (``a1 circle red``; an empty cell
``b3 empty .``); its other three rows are the filler ``" ."`` (background). Read in the decoder's
order (patch rows top to bottom, left to right), the first patch row of a board row is
``a1 circle red b1 empty . c1 star blue d1 square green``, then 48 fillers. The colour follows the
shape because the question names the shape ("what colour is the star?"): the answer is then the
word after the matched one, what a pretrained decoder copies best. With the caption embeddings
given exactly (no vision tower), on 12 validation needles at 8 images the decoder named the
star's colour 11 times with this order against 8 with the colour first (``a1 red circle``), which
it often answered with the next cell's colour. A layout whose other rows repeated the cell's words
(``red circle red circle``, as neighbouring patches of one object look alike) was worse still at
16-32 images (5 of 7 against 7 of 7 with the filler).

Prompts (multi-image, as LLaVA-OneVision packs them): each image is its base tile's 256 features
plus one image-newline token (the newline's word embedding), 257 ``<|image_pad|>`` positions, after
the text ``Image k:``; the question follows the last image in the same user turn of Qwen's chat
template. A single image is tiled "anyres" like any LLaVA-OneVision prompt (base tile plus one
224 px tile with a newline per row, 528 positions).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import (
    AutoModel,
    GenerationConfig,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionImageProcessor,
    Qwen2Config,
)
from transformers.models.llava_onevision.modeling_llava_onevision import LlavaOnevisionMultiModalProjector

from hybridkv.data.visual_tasks import COLUMN_NAMES, Scene, TaskConfig
from hybridkv.models.tiny import llava_onevision_image_tokens
from hybridkv.models.tiny_vlm import verify_checksums, write_checksums

NAME = "coder-vlm"
"""The ``--model`` name of this model."""

DECODER = "qwen2.5-coder-1.5b"
"""The real-weights decoder (a :data:`hybridkv.models.KNOWN_MODELS` name)."""

ASSET_DIR = Path(__file__).resolve().parent.parent / "assets" / "coder_vlm"
"""Where the trained vision path lives."""

WEIGHTS_FILE = "vision.safetensors"
SETTINGS_FILE = "vision_config.json"

TASK_CONFIG = TaskConfig(grid=4, image_size=224, min_items=6, max_items=12, min_images=8, max_images=32)
"""Boards the model is trained and evaluated on: 4 x 4 cells of 56 px (4 x 4 patches each)."""

PATCH = 14
"""SigLIP patch side in pixels."""

IMAGE_PAD = "<|image_pad|>"
VIDEO_PAD = "<|video_pad|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
NEWLINE = "\n"
FILLER = " ."
"""The words of background patches (and the shape slot of an empty cell)."""

SYSTEM = "You are a helpful assistant."


@dataclass(frozen=True)
class VisionSize:
    """The trained vision path: a SigLIP tower of ``layers`` blocks of width ``hidden`` with
    ``heads`` heads and MLP width ``intermediate``; LLaVA-OneVision's projector maps its last
    block's output to the decoder's width through one hidden layer of that width (GELU)."""

    hidden: int = 192
    intermediate: int = 768
    layers: int = 4
    heads: int = 4


def cell_words(scene: Scene, row: int, col: int) -> list[list[str]]:
    """The 4 x 4 patch words of cell (``row``, ``col``) (0-based), patch rows top to bottom."""
    item = scene.item_at(row, col)
    shape = f" {item.shape}" if item else " empty"
    colour = f" {item.colour}" if item else FILLER
    first = [f" {COLUMN_NAMES[col]}", str(row + 1), shape, colour]
    return [first] + [[FILLER] * 4 for _ in range(3)]


def patch_words(scene: Scene) -> list[str]:
    """The 256 words of a board's patches in the decoder's order (row-major over the 16 x 16 patches)."""
    sub = TASK_CONFIG.image_size // TASK_CONFIG.grid // PATCH
    if (scene.grid, scene.image_size) != (TASK_CONFIG.grid, TASK_CONFIG.image_size):
        raise ValueError(f"coder-vlm reads {TASK_CONFIG.grid}x{TASK_CONFIG.grid} boards of {TASK_CONFIG.image_size} px, "
                         f"got {scene.grid}x{scene.grid} of {scene.image_size} px.")
    blocks = [[cell_words(scene, r, c) for c in range(scene.grid)] for r in range(scene.grid)]
    return [blocks[r][c][s][k] for r in range(scene.grid) for s in range(sub) for c in range(scene.grid) for k in range(sub)]


def word_ids(tokenizer, words: Sequence[str]) -> torch.Tensor:
    """(len(words),) ids; every word must be one token of ``tokenizer``."""
    ids = []
    for word in words:
        encoded = tokenizer(word, add_special_tokens=False)["input_ids"]
        if len(encoded) != 1:
            raise ValueError(f"caption word {word!r} is {len(encoded)} tokens of this tokenizer; it must be one.")
        ids.append(encoded[0])
    return torch.tensor(ids)


def patch_targets(scene: Scene, tokenizer) -> torch.Tensor:
    """(256,) token ids the 256 visual tokens of ``scene`` are trained to embed as."""
    return word_ids(tokenizer, patch_words(scene))


def coder_vlm_config(text_config, size: VisionSize = VisionSize(), image_token_id: int = 151655,
                     video_token_id: int = 151656) -> LlavaOnevisionConfig:
    """The LLaVA-OneVision config around the decoder's own ``text_config`` object (shared, so
    attention settings made on the model reach the decoder's modules)."""
    vision = {
        "model_type": "siglip_vision_model", "hidden_size": size.hidden, "intermediate_size": size.intermediate,
        "num_hidden_layers": size.layers, "num_attention_heads": size.heads, "image_size": TASK_CONFIG.image_size,
        "patch_size": PATCH, "vision_use_head": False,
    }
    side = TASK_CONFIG.image_size
    return LlavaOnevisionConfig(
        vision_config=vision, text_config=text_config, image_token_index=image_token_id,
        video_token_index=video_token_id, vision_feature_select_strategy="full", vision_feature_layer=-1,
        vision_aspect_ratio="anyres_max_9", image_grid_pinpoints=[[side, side]],
        tie_word_embeddings=text_config.tie_word_embeddings,
    )


class VisionPath(nn.Module):
    """What training changes: the tower, the projector and the image-newline vector, under the
    names they have in ``LlavaOnevisionModel`` (so the state dict loads into it unchanged)."""

    def __init__(self, config: LlavaOnevisionConfig) -> None:
        super().__init__()
        self.vision_tower = AutoModel.from_config(config.vision_config)
        self.multi_modal_projector = LlavaOnevisionMultiModalProjector(config)
        self.image_newline = nn.Parameter(torch.zeros(config.text_config.hidden_size))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, 224, 224) normalised pixels -> (B, 256, hidden) visual tokens, as the model computes them."""
        hidden = self.vision_tower(pixel_values, output_hidden_states=True).hidden_states[-1]
        return self.multi_modal_projector(hidden)


def save_vision(path: VisionPath, size: VisionSize, directory: Path = ASSET_DIR, report: dict | None = None) -> Path:
    """Write the vision path (fp16 safetensors), its size, an optional training report, then checksums."""
    import json

    directory.mkdir(parents=True, exist_ok=True)
    for f in directory.iterdir():
        if f.is_file():
            f.unlink()
    save_file({k: v.detach().to(torch.float16).contiguous() for k, v in path.state_dict().items()}, directory / WEIGHTS_FILE)
    (directory / SETTINGS_FILE).write_text(json.dumps(asdict(size), indent=1) + "\n")
    if report is not None:
        (directory / "training_report.json").write_text(json.dumps(report, indent=1) + "\n")
    return write_checksums(directory)


def vision_size(directory: Path = ASSET_DIR) -> VisionSize:
    """The size recorded beside the bundled weights."""
    import json

    return VisionSize(**json.loads((directory / SETTINGS_FILE).read_text()))


def generation_config(tokenizer) -> GenerationConfig:
    """Greedy decoding that stops at ``<|im_end|>`` (or ``<|endoftext|>``)."""
    return GenerationConfig(do_sample=False, max_new_tokens=4, pad_token_id=tokenizer.pad_token_id,
                            eos_token_id=[tokenizer.convert_tokens_to_ids(IM_END), tokenizer.pad_token_id])


def build_image_processor() -> LlavaOnevisionImageProcessor:
    """LLaVA-OneVision's image processor for the 224 px boards (SigLIP normalisation, one 224 px pinpoint)."""
    side = TASK_CONFIG.image_size
    return LlavaOnevisionImageProcessor(size={"height": side, "width": side}, crop_size={"height": side, "width": side},
                                        image_grid_pinpoints=[[side, side]], image_mean=[0.5] * 3, image_std=[0.5] * 3)


def load_coder_vlm(dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", directory: Path = ASSET_DIR,
                   verify: bool = True) -> tuple[LlavaOnevisionForConditionalGeneration, object, LlavaOnevisionImageProcessor]:
    """The model (eval mode, sdpa attention), its tokenizer and image processor, offline once the
    decoder is cached.

    The decoder modules are the loader's own (no copy of the 1.5B weights is made); the vision
    path comes from ``directory`` (checked against its checksums).
    """
    from hybridkv.models.pretrained import load_pretrained

    if verify:
        verify_checksums(directory)
    decoder, tokenizer = load_pretrained(DECODER, dtype)
    config = coder_vlm_config(decoder.config, vision_size(directory),
                              tokenizer.convert_tokens_to_ids(IMAGE_PAD), tokenizer.convert_tokens_to_ids(VIDEO_PAD))
    with torch.device("meta"):
        model = LlavaOnevisionForConditionalGeneration(config)
    model.model.language_model = decoder.model
    model.lm_head = decoder.lm_head
    path = VisionPath(config)
    path.load_state_dict(load_file(directory / WEIGHTS_FILE))
    model.model.vision_tower, model.model.multi_modal_projector = path.vision_tower, path.multi_modal_projector
    model.model.image_newline = path.image_newline
    model.to(dtype)
    model.config._attn_implementation = "sdpa"
    model.config.vision_config._attn_implementation = "sdpa"
    meta = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if meta:
        raise RuntimeError(f"coder-vlm left tensors unloaded: {meta[:5]}")
    assert model.model.language_model.config is model.config.text_config
    model.generation_config = generation_config(tokenizer)
    return model.to(device).eval(), tokenizer, build_image_processor()


def prompt_text(question: str, num_image_tokens: Sequence[int], note: str = "") -> str:
    """The chat prompt: ``Image k:`` and the image's placeholders per image, then ``note`` if one is
    given and the question. The bundled prompt has no note: on the validation needles every note
    tried narrowed the answer colour's margin (``scripts/prompt_wording.py``, docs/coder_vlm.md)."""
    images = "".join(f"Image {k}:{IMAGE_PAD * n}" for k, n in enumerate(num_image_tokens, 1))
    text = f"{note} {question}" if note else question
    return (f"{IM_START}system\n{SYSTEM}{IM_END}\n{IM_START}user\n{images}{text} "
            f"Answer with one word.{IM_END}\n{IM_START}assistant\n")


def question_text(question: str) -> str:
    """A visual task's question (words and punctuation separated by spaces) as a sentence."""
    text = question.replace(" ?", "?")
    return text[0].upper() + text[1:]


def build_inputs(tokenizer, image_processor: LlavaOnevisionImageProcessor, images: Sequence[Image.Image],
                 question: str, config: LlavaOnevisionConfig | None = None,
                 note: str = "") -> dict[str, torch.Tensor]:
    """Model inputs of one prompt (batch 1); ``note``, if given, is said before the question.

    Returns:
        ``input_ids`` / ``attention_mask`` (1, L), ``pixel_values`` (images, tiles, 3, 224, 224),
        ``image_sizes`` (images, 2) and ``batch_num_images`` (1,).
    """
    if not images:
        raise ValueError("a coder-vlm prompt needs at least one image")
    config = config or coder_vlm_config(Qwen2Config())
    vision = image_processor(images=list(images), return_tensors="pt")
    alone = len(images) == 1
    counts = [llava_onevision_image_tokens(config, int(h), int(w), alone)[0] for h, w in vision["image_sizes"].tolist()]
    encoded = tokenizer(prompt_text(question_text(question), counts, note), return_tensors="pt", add_special_tokens=False)
    return {
        "input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"],
        "pixel_values": vision["pixel_values"], "image_sizes": vision["image_sizes"],
        "batch_num_images": torch.tensor([len(images)]),
    }


__all__ = [
    "ASSET_DIR", "NAME", "TASK_CONFIG", "VisionPath", "VisionSize", "build_image_processor", "build_inputs",
    "cell_words", "coder_vlm_config", "load_coder_vlm", "patch_targets", "patch_words", "prompt_text", "save_vision",
]
