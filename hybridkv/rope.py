"""Undo rotary position embeddings (RoPE) on cached keys.

The cache holds keys after RoPE: a key's direction then also encodes its position, so a
position-free comparison of keys (key diversity, :func:`hybridkv.scoring.key_diversity`) sees
position as content. Every architecture hybridkv supports rotates the ``(i, i + D/2)`` channel
pairs (transformers' ``rotate_half`` convention) and hands the cache the ``cos``/``sin`` it used
(``cache_kwargs`` of ``Cache.update``); rotating back by the same angles gives the keys'
position-free directions (scaled by the square of any attention scaling the RoPE variant folds
into ``cos``/``sin``, which cosine comparisons ignore).
"""

from __future__ import annotations

import torch


def token_rotation(cos: torch.Tensor, sin: torch.Tensor,
                   mrope_section: tuple[int, ...] = ()) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The per-token ``(cos, sin)``, each (B, Q, D), that a forward applied to its keys.

    Args:
        cos / sin: what the model passed to the cache: (B, Q, D), or Qwen2-VL's multimodal
            (3, B, Q, D) with one angle set per (time, row, column) position; B is 1 when every
            sequence of the batch has the same positions.
        mrope_section: channel pairs per position axis, for the (3, B, Q, D) form.
    Returns:
        None when the tensors are not the ``rotate_half`` form (both channel halves equal):
        the keys cannot be rotated back.
    """
    if cos.dim() == 4:
        if sum(mrope_section) * 2 != cos.shape[-1]:
            return None
        split = list(mrope_section) * 2
        cos = torch.cat([part[i % 3] for i, part in enumerate(cos.split(split, dim=-1))], dim=-1)
        sin = torch.cat([part[i % 3] for i, part in enumerate(sin.split(split, dim=-1))], dim=-1)
    if cos.dim() != 3 or cos.shape != sin.shape or cos.shape[-1] % 2:
        return None
    half = cos.shape[-1] // 2
    if not (torch.equal(cos[..., :half], cos[..., half:]) and torch.equal(sin[..., :half], sin[..., half:])):
        return None
    return cos, sin


def derotate(keys: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """(Hkv, S, D) float32 keys rotated back to position zero.

    Args:
        keys: (Hkv, S, D) keys after RoPE. cos / sin: (S, D) the rotation applied to each of them.
    """
    k = keys.float()
    half = k.shape[-1] // 2
    turned = torch.cat([-k[..., half:], k[..., :half]], dim=-1)  # rotate_half
    return k * cos.float() - turned * sin.float()
