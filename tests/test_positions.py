"""Compressed decoding equals a full cache with the dropped entries masked out.

The reference is independent of the engine: plain transformers with a DynamicCache holding
every token, and an eager attention function (registered in this test) that puts -inf on the
(head, prompt position) entries the compressed run dropped. Same logits means every kept token
kept its RoPE position and decoding continued at the original positions (M-RoPE included).
"""

import pytest
import torch
from transformers import AttentionInterface

from hybridkv import AdaKV, SnapKV, StreamingLLM

REFERENCE = "hybridkv_test_masked_reference"
_DROP: dict[int, torch.Tensor] = {}  # layer_idx -> (Hkv, prompt_len) bool, True = dropped


def masked_reference_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """Eager attention over the full cache with dropped prompt entries masked (batch 1)."""
    _, hq, q_len, dim = query.shape
    kv_heads, k_len = key.shape[1], key.shape[2]
    group = hq // kv_heads
    k = key[0].repeat_interleave(group, dim=0)  # (Hq, K, D)
    v = value[0].repeat_interleave(group, dim=0)
    logits = torch.einsum("hqd,hkd->hqk", query[0], k) * scaling
    q_pos = torch.arange(k_len - q_len, k_len)
    masked = torch.arange(k_len)[None, :] > q_pos[:, None]  # causal (Q, K)
    logits = logits.masked_fill(masked[None], float("-inf"))
    drop = _DROP.get(module.layer_idx)
    if drop is not None and q_len == 1:  # decoding: prompt entries the compressed run dropped
        full = torch.zeros(kv_heads, k_len, dtype=torch.bool)
        full[:, : drop.shape[1]] = drop
        logits = logits.masked_fill(full.repeat_interleave(group, dim=0)[:, None, :], float("-inf"))
    out = torch.einsum("hqk,hkd->hqd", torch.softmax(logits, dim=-1), v)
    return out.transpose(0, 1)[None].contiguous(), None


AttentionInterface.register(REFERENCE, masked_reference_attention)


def dropped_masks(method, prompt_len):
    """Per layer (Hkv, L) True where the compressed cache no longer holds the prompt entry."""
    masks = {}
    for idx, layer in enumerate(method._engine.cache.layers):
        keep = torch.zeros(layer.kv_heads, prompt_len, dtype=torch.bool)
        keep[layer.prefix_heads.long(), layer.prefix_positions.long()] = True
        masks[idx] = ~keep
    return masks


@pytest.mark.parametrize("make_method", [lambda: SnapKV(0.25, window_size=8), lambda: AdaKV(0.2, window_size=8),
                                         lambda: StreamingLLM(0.3)], ids=["SnapKV", "AdaKV", "StreamingLLM"])
def test_compressed_decoding_equals_masked_full_cache(case, make_method):
    model, inputs, _, _ = case
    prompt_len = inputs["input_ids"].shape[1]
    method = make_method()
    kwargs = dict(max_new_tokens=8, do_sample=False, output_logits=True, return_dict_in_generate=True)
    with method.apply(model):
        out = model.generate(**inputs, **kwargs)
    assert all(n < prompt_len for layer in method.report.head_budgets for n in layer)  # really compressed
    _DROP.clear()
    _DROP.update(dropped_masks(method, prompt_len))
    config = model.get_decoder().layers[0].self_attn.config
    saved = config._attn_implementation_internal
    config._attn_implementation_internal = REFERENCE
    try:
        # greedy decoding through the masked full cache must give the same tokens and logits
        ref = model.generate(**inputs, **kwargs)
    finally:
        config._attn_implementation_internal = saved
        _DROP.clear()
    assert torch.equal(ref.sequences, out.sequences)
    assert max((a - b).abs().max().item() for a, b in zip(out.logits, ref.logits)) < 1e-4
