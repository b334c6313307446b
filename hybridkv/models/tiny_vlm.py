"""The project's tiny Qwen2.5-VL-architecture model: build, save, load and prompt it.

Everything works without torchvision and without hub access:

- a word-level tokenizer over the words of :mod:`hybridkv.data.visual_tasks` plus the
  Qwen2.5-VL special tokens (:data:`SPECIAL_TOKENS`), a ``PreTrainedTokenizerFast``;
- a small :class:`~transformers.Qwen2_5_VLConfig` (real vision tower with window
  attention and 2x2 patch merger, real M-RoPE text decoder, tiny dims: :class:`TinyVLMSize`);
- the slow :class:`~transformers.Qwen2VLImageProcessor` (a 168x168 board of the visual
  tasks gives ``image_grid_thw`` ``[1, 12, 12]``: 144 patches of 1176 values, 36 visual
  tokens after the 2x2 merge; 16 images make 576 visual tokens);
- a chat-format prompt builder (:func:`build_inputs`) and a greedy answer helper;
- the bundled weights in ``hybridkv/assets/tiny_vlm/`` (trained by
  ``scripts/train_tiny_vlm.py``), checked against ``checksums.sha256`` at load.

Prompt format, one user turn::

    <|im_start|>user\\n<|vision_start|><|image_pad|>*N<|vision_end|>...question<|im_end|>\\n<|im_start|>assistant\\n

followed, for training, by ``answer<|im_end|>``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from tokenizers import Regex, Tokenizer, models, pre_tokenizers
from transformers import (
    GenerationConfig,
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLImageProcessor,
)

from hybridkv.data.visual_tasks import vocabulary

ASSET_DIR = Path(__file__).resolve().parent.parent / "assets" / "tiny_vlm"
"""Where the bundled model lives."""

CHECKSUM_FILE = "checksums.sha256"
"""Name of the checksum list inside an asset directory (``sha256sum`` format)."""

UNK_TOKEN = "<unk>"
PAD_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"
IMAGE_PAD = "<|image_pad|>"
VIDEO_PAD = "<|video_pad|>"
SPECIAL_TOKENS: tuple[str, ...] = (
    UNK_TOKEN,
    PAD_TOKEN,
    IM_START,
    IM_END,
    VISION_START,
    VISION_END,
    IMAGE_PAD,
    VIDEO_PAD,
)
"""Special tokens, with ids 0..7 in this order."""

CHAT_WORDS: tuple[str, ...] = ("\n", "user", "assistant")
"""Non-special words of the chat template."""

IGNORE_INDEX = -100
"""Label value of positions that carry no loss."""


class AssetChecksumError(RuntimeError):
    """The bundled model files are missing or differ from their recorded sha256."""


@dataclass(frozen=True)
class TinyVLMSize:
    """Architecture of the tiny model (all other Qwen2.5-VL settings keep their defaults).

    Text decoder: ``hidden_size`` with ``num_heads`` query heads of ``hidden_size // num_heads``
    dims sharing ``num_kv_heads`` KV heads. M-RoPE splits the ``head_dim // 2`` rotary
    frequencies, which fall geometrically from 1 to about ``1 / rope_theta``, into
    (temporal, height, width) sections ``mrope_section`` in that order, so the width
    section always gets the lowest frequencies. The defaults (theta 1000, sections
    2/4/10) give the height section frequencies of 0.4..0.1 rad per visual token, leave
    the temporal section (constant inside an image) small, and keep width frequencies down
    to 0.0015 rad per token, nearly position-independent over a ~1000-token prompt, for
    content lookups across many images.

    Vision tower: ``vision_depth`` blocks of width ``vision_hidden_size`` with
    ``vision_heads`` heads; windows of ``window_size`` pixels except the last block, which
    attends over the whole image; a 2x2 merger projects to ``hidden_size``.
    """

    hidden_size: int = 128
    intermediate_size: int = 384
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    rope_theta: float = 1000.0
    mrope_section: tuple[int, int, int] = (2, 4, 10)
    vision_hidden_size: int = 128
    vision_intermediate_size: int = 256
    vision_depth: int = 2
    vision_heads: int = 4
    window_size: int = 112
    max_position_embeddings: int = 8192

    def __post_init__(self) -> None:
        head_dim = self.hidden_size // self.num_heads
        if sum(self.mrope_section) * 2 != head_dim:
            raise ValueError(f"mrope_section {self.mrope_section} must sum to head_dim/2 = {head_dim // 2}")


def build_tokenizer(words: Sequence[str] | None = None) -> PreTrainedTokenizerFast:
    """A word-level tokenizer: ``SPECIAL_TOKENS`` (ids 0..7), ``CHAT_WORDS``, then ``words``.

    Text splits on spaces/tabs; ``"\\n"`` is a token of its own; unknown words map to
    ``<unk>``. Pad is ``<|endoftext|>``, eos is ``<|im_end|>`` (as in Qwen2.5-VL-Instruct).

    Args:
        words: the task vocabulary (default: :func:`hybridkv.data.visual_tasks.vocabulary`).
    """
    words = list(vocabulary() if words is None else words)
    tokens = list(SPECIAL_TOKENS) + list(CHAT_WORDS) + [w for w in words if w not in CHAT_WORDS]
    if len(set(tokens)) != len(tokens):
        raise ValueError("duplicate words in the vocabulary")
    backend = Tokenizer(models.WordLevel({t: i for i, t in enumerate(tokens)}, unk_token=UNK_TOKEN))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(r"[ \t]+"), behavior="removed"),
            pre_tokenizers.Split(Regex(r"\n"), behavior="isolated"),
        ]
    )
    backend.add_special_tokens(list(SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token=UNK_TOKEN,
        pad_token=PAD_TOKEN,
        eos_token=IM_END,
        padding_side="left",
    )


def build_image_processor() -> Qwen2VLImageProcessor:
    """The slow Qwen2-VL image processor with Qwen2.5-VL's defaults (14 px patches, 2x2 merge).

    ``max_pixels`` is 168*168 (the training size), so bigger inputs are downscaled to about
    36 visual tokens per image.
    """
    return Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=168 * 168)


def tiny_vlm_config(tokenizer: PreTrainedTokenizerFast, size: TinyVLMSize = TinyVLMSize()) -> Qwen2_5_VLConfig:
    """The model config for ``tokenizer``'s vocabulary, with its special token ids set."""
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    vision = {
        "depth": size.vision_depth,
        "hidden_size": size.vision_hidden_size,
        "intermediate_size": size.vision_intermediate_size,
        "num_heads": size.vision_heads,
        "window_size": size.window_size,
        "fullatt_block_indexes": [size.vision_depth - 1],
        "out_hidden_size": size.hidden_size,
    }
    text = {
        "vocab_size": len(tokenizer),
        "hidden_size": size.hidden_size,
        "intermediate_size": size.intermediate_size,
        "num_hidden_layers": size.num_layers,
        "num_attention_heads": size.num_heads,
        "num_key_value_heads": size.num_kv_heads,
        "max_position_embeddings": size.max_position_embeddings,
        "rms_norm_eps": 1e-6,
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": size.rope_theta,
            "mrope_section": list(size.mrope_section),
        },
        "bos_token_id": None,
        "eos_token_id": ids[IM_END],
        "pad_token_id": ids[PAD_TOKEN],
    }
    return Qwen2_5_VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=ids[IMAGE_PAD],
        video_token_id=ids[VIDEO_PAD],
        vision_start_token_id=ids[VISION_START],
        vision_end_token_id=ids[VISION_END],
        tie_word_embeddings=False,
    )


def generation_config(tokenizer: PreTrainedTokenizerFast) -> GenerationConfig:
    """Greedy decoding that stops at ``<|im_end|>`` and pads with ``<|endoftext|>``."""
    return GenerationConfig(
        do_sample=False,
        max_new_tokens=8,
        eos_token_id=tokenizer.convert_tokens_to_ids(IM_END),
        pad_token_id=tokenizer.convert_tokens_to_ids(PAD_TOKEN),
        bos_token_id=None,
    )


def build_tiny_vlm(
    tokenizer: PreTrainedTokenizerFast, size: TinyVLMSize = TinyVLMSize(), seed: int = 0
) -> Qwen2_5_VLForConditionalGeneration:
    """A freshly initialised model (fp32, sdpa attention, eval mode), deterministic in ``seed``."""
    torch.manual_seed(seed)
    config = tiny_vlm_config(tokenizer, size)
    config._attn_implementation = "sdpa"
    model = Qwen2_5_VLForConditionalGeneration(config)
    model.generation_config = generation_config(tokenizer)
    return model.eval()


def image_token_counts(image_grid_thw: torch.Tensor, image_processor: Qwen2VLImageProcessor) -> list[int]:
    """Visual tokens per image: ``t*h*w / merge_size**2`` for each row of ``image_grid_thw`` (n_images, 3)."""
    merge = image_processor.merge_size**2
    return [int(t * h * w) // merge for t, h, w in image_grid_thw.tolist()]


def prompt_text(question: str, num_image_tokens: Sequence[int], answer: str | None = None) -> str:
    """The chat-format prompt with one ``<|vision_start|>...<|vision_end|>`` run per image.

    Args:
        question: question text.
        num_image_tokens: visual tokens of each image, in order.
        answer: when given, appended with its closing ``<|im_end|>`` (training text).
    """
    vision = "".join(VISION_START + IMAGE_PAD * n + VISION_END for n in num_image_tokens)
    text = f"{IM_START}user\n{vision}{question}{IM_END}\n{IM_START}assistant\n"
    return text if answer is None else f"{text}{answer}{IM_END}"


def build_inputs(
    tokenizer: PreTrainedTokenizerFast,
    image_processor: Qwen2VLImageProcessor,
    images: Sequence[Image.Image] | Sequence[Sequence[Image.Image]],
    questions: str | Sequence[str],
    answers: Sequence[str] | None = None,
) -> dict[str, torch.Tensor]:
    """Model inputs for one prompt or a left-padded batch of prompts.

    Args:
        tokenizer: from :func:`build_tokenizer` / :func:`load_tiny_vlm`.
        image_processor: from :func:`build_image_processor` / :func:`load_tiny_vlm`.
        images: the images of one prompt (with ``questions`` a str), or one list of images
            per prompt (with ``questions`` a sequence of the same length).
        questions: question text(s).
        answers: per prompt, an answer to append (teacher forcing); adds ``labels``.

    Returns:
        ``input_ids`` (B, L) long, ``attention_mask`` (B, L) long (0 on left padding),
        ``pixel_values`` (P, 1176) float32 with P the patches of all images of all prompts
        in order, ``image_grid_thw`` (I, 3) long with I the number of images, and with
        ``answers`` also ``labels`` (B, L) long: the answer and its ``<|im_end|>``, -100
        elsewhere.
    """
    if isinstance(questions, str):
        questions, per_prompt = [questions], [list(images)]
    else:
        questions, per_prompt = list(questions), [list(imgs) for imgs in images]
    if len(per_prompt) != len(questions) or (answers is not None and len(answers) != len(questions)):
        raise ValueError("images, questions and answers must have one entry per prompt")
    flat = [img for imgs in per_prompt for img in imgs]
    if not flat:
        raise ValueError("every prompt of the tiny VLM needs at least one image")
    vision = image_processor(images=flat, return_tensors="pt")
    counts = image_token_counts(vision["image_grid_thw"], image_processor)
    texts, start = [], 0
    for i, (question, imgs) in enumerate(zip(questions, per_prompt)):
        answer = None if answers is None else answers[i]
        texts.append(prompt_text(question, counts[start : start + len(imgs)], answer))
        start += len(imgs)
    encoded = tokenizer(texts, padding=True, return_tensors="pt", padding_side="left")
    inputs = {
        "input_ids": encoded["input_ids"],
        "attention_mask": encoded["attention_mask"],
        "pixel_values": vision["pixel_values"],
        "image_grid_thw": vision["image_grid_thw"],
    }
    if answers is not None:
        inputs["labels"] = _answer_labels(tokenizer, inputs["input_ids"], inputs["attention_mask"])
    return inputs


def _answer_labels(
    tokenizer: PreTrainedTokenizerFast,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
) -> torch.Tensor:
    """Labels (B, L): the tokens after the last ``<|im_start|>assistant\\n`` of each row, -100 elsewhere."""
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    im_start = tokenizer.convert_tokens_to_ids(IM_START)
    for row in range(input_ids.shape[0]):
        last = int((input_ids[row] == im_start).nonzero()[-1])
        answer_from = last + 3  # <|im_start|> assistant \n
        labels[row, answer_from:] = input_ids[row, answer_from:]
    return labels.masked_fill(attention_mask == 0, IGNORE_INDEX)


@torch.no_grad()
def answer(
    model: Qwen2_5_VLForConditionalGeneration,
    tokenizer: PreTrainedTokenizerFast,
    image_processor: Qwen2VLImageProcessor,
    images: Sequence[Image.Image],
    question: str,
    max_new_tokens: int = 4,
) -> str:
    """Greedy answer of ``model`` to ``question`` about ``images`` (special tokens stripped)."""
    inputs = build_inputs(tokenizer, image_processor, images, question)
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()


def _sha256(path: Path) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_checksums(path: str | Path) -> Path:
    """Record the sha256 of every file in directory ``path`` (but the list itself) in ``checksums.sha256``."""
    path = Path(path)
    lines = [f"{_sha256(f)}  {f.name}\n" for f in sorted(path.iterdir()) if f.is_file() and f.name != CHECKSUM_FILE]
    out = path / CHECKSUM_FILE
    out.write_text("".join(lines))
    return out


def verify_checksums(path: str | Path) -> None:
    """Check every file listed in ``path/checksums.sha256``.

    Raises:
        AssetChecksumError: the list or a listed file is missing, or a digest differs.
    """
    path = Path(path)
    listing = path / CHECKSUM_FILE
    if not listing.is_file():
        raise AssetChecksumError(
            f"no {CHECKSUM_FILE} in {path}: the tiny VLM assets are missing; run scripts/train_tiny_vlm.py"
        )
    for line in listing.read_text().splitlines():
        expected, name = line.split(maxsplit=1)
        file = path / name
        if not file.is_file():
            raise AssetChecksumError(f"{file} is missing (listed in {listing})")
        actual = _sha256(file)
        if actual != expected:
            raise AssetChecksumError(
                f"{file} has sha256 {actual}, expected {expected}: the file is corrupt or was replaced"
            )


def save_tiny_vlm(
    model: Qwen2_5_VLForConditionalGeneration,
    tokenizer: PreTrainedTokenizerFast,
    image_processor: Qwen2VLImageProcessor,
    path: str | Path = ASSET_DIR,
    dtype: torch.dtype = torch.float16,
) -> Path:
    """Write weights (safetensors in ``dtype``), configs, tokenizer and processor, then checksums."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    for f in path.iterdir():
        if f.is_file():
            f.unlink()
    original = next(model.parameters()).dtype
    model.to(dtype).save_pretrained(path)
    model.to(original)
    tokenizer.save_pretrained(path)
    image_processor.save_pretrained(path)
    return write_checksums(path)


def load_tiny_vlm(
    path: str | Path = ASSET_DIR,
    dtype: torch.dtype = torch.float32,
    verify: bool = True,
    device: str | torch.device = "cpu",
) -> tuple[Qwen2_5_VLForConditionalGeneration, PreTrainedTokenizerFast, Qwen2VLImageProcessor]:
    """Load the bundled (or any saved) tiny VLM offline, in eval mode.

    Args:
        path: asset directory written by :func:`save_tiny_vlm`.
        dtype: parameter dtype after loading (weights are stored in fp16).
        verify: check ``checksums.sha256`` first.
        device: where the model goes.

    Returns:
        ``(model, tokenizer, image_processor)``.

    Raises:
        AssetChecksumError: with ``verify``, when files are missing or corrupt.
    """
    path = Path(path)
    if verify:
        verify_checksums(path)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(path, local_files_only=True)
    image_processor = Qwen2VLImageProcessor.from_pretrained(path, local_files_only=True)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
        path, dtype=dtype, attn_implementation="sdpa", local_files_only=True
    )
    model.generation_config = generation_config(tokenizer)
    return model.to(device).eval(), tokenizer, image_processor


__all__ = [
    "ASSET_DIR",
    "SPECIAL_TOKENS",
    "AssetChecksumError",
    "TinyVLMSize",
    "answer",
    "build_image_processor",
    "build_inputs",
    "build_tiny_vlm",
    "build_tokenizer",
    "generation_config",
    "image_token_counts",
    "load_tiny_vlm",
    "prompt_text",
    "save_tiny_vlm",
    "tiny_vlm_config",
    "verify_checksums",
    "write_checksums",
]
