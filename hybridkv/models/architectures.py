"""What differs per supported architecture: where the decoder's attention layers are, the
visual token ids, and the KV geometry."""

from __future__ import annotations

from dataclasses import dataclass

import torch

SUPPORTED_MODEL_TYPES: dict[str, str] = {
    "qwen2_5_vl": "Qwen2.5-VL (Qwen2_5_VLForConditionalGeneration)",
    "qwen2_vl": "Qwen2-VL (Qwen2VLForConditionalGeneration)",
    "qwen3_vl": "Qwen3-VL (Qwen3VLForConditionalGeneration)",
    "llava_onevision": "LLaVA-OneVision (LlavaOnevisionForConditionalGeneration)",
    "internvl": "InternVL (InternVLForConditionalGeneration)",
    "qwen2": "Qwen2 / Qwen2.5 text decoders (Qwen2ForCausalLM)",
    "qwen3": "Qwen3 text decoders (Qwen3ForCausalLM)",
    "llama": "Llama text decoders (LlamaForCausalLM, e.g. SmolLM2)",
}
"""Keys are the outer ``config.model_type`` transformers gives each architecture (a composite
vision-language model reports its own type, e.g. ``"llava_onevision"``, not its decoder's)."""
MULTIMODAL_MODEL_TYPES = ("qwen2_5_vl", "qwen2_vl", "qwen3_vl", "llava_onevision", "internvl")
MROPE_MODEL_TYPES = ("qwen2_5_vl", "qwen2_vl", "qwen3_vl")
"""Architectures whose visual tokens get multimodal (time, row, column) rotary positions; the others
give every token, visual or not, one consecutive 1-D position."""


class UnsupportedModelError(ValueError):
    """The model's architecture is not one hybridkv knows how to compress."""


@dataclass(frozen=True)
class ModelSpec:
    """KV geometry and modality facts of a supported model.

    Attributes:
        model_type: ``config.model_type`` (a key of :data:`SUPPORTED_MODEL_TYPES`).
        num_layers / num_heads / num_kv_heads / head_dim: the text decoder's attention shape.
        visual_token_ids: ids of image/video placeholder tokens (empty for text models).
        turn_end_ids: ids that end a chat turn (the generation config's eos ids).
        mrope_section: channel pairs per (time, row, column) axis of multimodal RoPE, from the
            config's ``rope_parameters`` (empty for 1-D RoPE).
    """

    model_type: str
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    visual_token_ids: tuple[int, ...]
    turn_end_ids: tuple[int, ...]
    mrope_section: tuple[int, ...] = ()

    @property
    def is_multimodal(self) -> bool:
        """True for the vision-language architectures."""
        return self.model_type in MULTIMODAL_MODEL_TYPES

    @property
    def has_mrope(self) -> bool:
        """True where visual tokens get multimodal rotary positions (:data:`MROPE_MODEL_TYPES`)."""
        return self.model_type in MROPE_MODEL_TYPES


def _supported_list() -> str:
    return "; ".join(SUPPORTED_MODEL_TYPES.values())


def model_spec(model: torch.nn.Module) -> ModelSpec:
    """Read the :class:`ModelSpec` of ``model`` or raise :class:`UnsupportedModelError`."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", type(model).__name__)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedModelError(
            f"hybridkv does not support model type {model_type!r}. Supported: {_supported_list()}."
        )
    if not hasattr(model, "generate"):
        raise UnsupportedModelError(
            f"hybridkv needs the generation head of the model ({type(model).__name__} has no generate()); "
            f"load it with the *ForCausalLM / *ForConditionalGeneration class. Supported: {_supported_list()}."
        )
    text = config.get_text_config(decoder=True)
    if _has_sliding_layers(text):
        raise UnsupportedModelError("hybridkv does not support sliding-window attention layers; set use_sliding_window=False.")
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    # LLaVA-OneVision stores them as image_token_index / video_token_index, which its config
    # also answers as *_token_id; InternVL has no video id (video frames are images to it).
    visual = tuple(
        int(i) for i in (getattr(config, "image_token_id", None), getattr(config, "video_token_id", None)) if i is not None
    ) if model_type in MULTIMODAL_MODEL_TYPES else ()
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    eos = eos if eos is not None else getattr(text, "eos_token_id", None)
    turn_end = tuple(int(i) for i in (eos if isinstance(eos, (list, tuple)) else [eos]) if i is not None)
    rope = getattr(text, "rope_parameters", None) or {}
    return ModelSpec(
        model_type=model_type,
        num_layers=text.num_hidden_layers,
        num_heads=heads,
        num_kv_heads=getattr(text, "num_key_value_heads", None) or heads,
        head_dim=head_dim,
        visual_token_ids=visual,
        turn_end_ids=turn_end,
        mrope_section=tuple(int(n) for n in rope.get("mrope_section", ())),
    )


def _has_sliding_layers(text) -> bool:
    """Whether any decoder layer of the text config ``text`` attends through a sliding window."""
    layer_types = getattr(text, "layer_types", None)
    if layer_types is not None:
        return any(kind == "sliding_attention" for kind in layer_types)
    return bool(getattr(text, "use_sliding_window", False))


def text_config(model: torch.nn.Module):
    """The config object the text decoder's attention modules read ``_attn_implementation`` from."""
    return attention_modules(model)[0].config


def attention_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The text decoder's self-attention modules, in layer order (index == ``layer_idx``)."""
    decoder = model.get_decoder()
    modules = [layer.self_attn for layer in decoder.layers]
    assert all(m.layer_idx == i for i, m in enumerate(modules)), "decoder layers out of order"
    return modules
