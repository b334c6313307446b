"""Compressed decoding equals a full cache with the dropped entries masked out.

The reference is independent of the engine: plain transformers with a DynamicCache holding
every token, and an eager attention function (registered in this test, with transformers' own
padding masks) that puts -inf on the (sequence, head, column) entries the compressed run dropped,
from the moment they were dropped (the end of the forward that compressed them). Same logits
means every kept token kept its RoPE position and decoding continued at the original positions
(M-RoPE included), for single prompts, left-padded batches and conversations of several turns.
"""

import pytest
import torch
from conftest import get_model, kept_positions
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from hybridkv import AdaKV, HybridKV, SnapKV, StreamingLLM
from hybridkv.models.tiny import text_inputs, visual_inputs

REFERENCE = "hybridkv_test_masked_reference"
_STATE: dict = {}  # "kept": per layer (B, H) lists of kept positions; "boundaries": seen counts at compressions


def masked_reference_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """Eager attention over the full cache: padding/causal mask from transformers, and the entries
    the compressed run had dropped by the start of this forward masked per sequence and head."""
    batch, hq, q_len, _ = query.shape
    kv_heads, k_len = key.shape[1], key.shape[2]
    group = hq // kv_heads
    k = key.repeat_interleave(group, dim=1)
    v = value.repeat_interleave(group, dim=1)
    logits = torch.einsum("bhqd,bhkd->bhqk", query, k) * scaling
    if attention_mask is not None:
        logits = logits.masked_fill(~attention_mask[..., :k_len], float("-inf"))
    else:
        causal = torch.arange(k_len)[None, :] > torch.arange(k_len - q_len, k_len)[:, None]
        logits = logits.masked_fill(causal, float("-inf"))
    compressed = max((b for b in _STATE.get("boundaries", []) if b <= k_len - q_len), default=0)
    if compressed:
        kept = _STATE["kept"][module.layer_idx]
        dropped = torch.ones(batch, kv_heads, k_len, dtype=torch.bool)
        dropped[:, :, compressed:] = False
        for b in range(batch):
            for h in range(kv_heads):
                dropped[b, h, [p for p in kept[b][h] if p < k_len]] = False
        logits = logits.masked_fill(dropped.repeat_interleave(group, dim=1)[:, :, None, :], float("-inf"))
    probs = torch.softmax(logits, dim=-1).nan_to_num(0.0)  # padded query rows see nothing: zeros, not NaN
    out = torch.einsum("bhqk,bhkd->bhqd", probs, v)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(REFERENCE, masked_reference_attention)
AttentionMaskInterface.register(REFERENCE, sdpa_mask)


def reference_run(model, kept, boundaries, run):
    """``run()`` on the plain model with the masked reference attention."""
    _STATE.update(kept=kept, boundaries=boundaries)
    config = model.get_decoder().layers[0].self_attn.config
    saved = config._attn_implementation_internal
    config._attn_implementation_internal = REFERENCE
    try:
        return run()
    finally:
        config._attn_implementation_internal = saved
        _STATE.clear()


KW = {"max_new_tokens": 8, "do_sample": False, "output_logits": True, "return_dict_in_generate": True}
METHODS = [lambda: SnapKV(0.25, window_size=8), lambda: AdaKV(0.2, window_size=8), lambda: StreamingLLM(0.3),
           lambda: HybridKV(0.4, max_dynamic_share=0.0, window=4)]
IDS = ["SnapKV", "AdaKV", "StreamingLLM", "HybridKV-static"]


@pytest.mark.parametrize("make_method", METHODS[:3], ids=IDS[:3])
def test_compressed_decoding_equals_masked_full_cache(case, make_method):
    model, inputs, _, _ = case
    prompt_len = inputs["input_ids"].shape[1]
    method = make_method()
    with method.apply(model) as engine:
        out = model.generate(**inputs, **KW)
        kept = kept_positions(engine.layers)
    assert all(n < prompt_len for layer in method.report.head_budgets for n in layer)  # really compressed
    ref = reference_run(model, kept, [prompt_len], lambda: model.generate(**inputs, **KW))
    assert torch.equal(ref.sequences, out.sequences)
    assert max((a - b).abs().max().item() for a, b in zip(out.logits, ref.logits)) < 1e-4


def left_padded(prompts: list[dict]) -> dict:
    """A left-padded batch of text prompts (1, L_i)."""
    width = max(p["input_ids"].shape[1] for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        n = p["input_ids"].shape[1]
        ids[i, width - n :] = p["input_ids"][0]
        mask[i, width - n :] = 1
    return {"input_ids": ids, "attention_mask": mask}


@pytest.mark.parametrize("make_method", METHODS, ids=IDS)
def test_left_padded_batch_equals_masked_full_cache(make_method):
    model = get_model("llama")
    inputs = left_padded([text_inputs(120, seed=1), text_inputs(80, seed=2), text_inputs(101, seed=3)])
    method = make_method()
    with method.apply(model) as engine:
        out = model.generate(**inputs, **KW)
        kept = kept_positions(engine.layers)
    assert all(p >= 40 for layer in kept for head in layer[1] for p in head)  # padding is never kept
    ref = reference_run(model, kept, [inputs["input_ids"].shape[1]], lambda: model.generate(**inputs, **KW))
    assert torch.equal(ref.sequences, out.sequences)
    assert max((a - b).abs().max().item() for a, b in zip(out.logits, ref.logits)) < 1e-4


def converse(model, turns: list[dict]):
    """Three user turns, each with its image, into one cache: (sequences, logits, prompt lengths)."""
    cache, sequences, logits, boundaries = None, None, [], []
    for turn in turns:
        ids = turn["input_ids"] if sequences is None else torch.cat([sequences, turn["input_ids"]], dim=1)
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=turn["pixel_values"],
                             image_grid_thw=turn["image_grid_thw"], past_key_values=cache, **KW)
        sequences, cache = out.sequences, out.past_key_values
        logits += list(out.logits)
        boundaries.append(ids.shape[1])
    return sequences, logits, boundaries


@pytest.mark.parametrize("make_method", METHODS, ids=IDS)
def test_three_turns_with_an_image_each_equal_masked_full_cache(make_method):
    """Every turn (its text, its image, the previous answer) is compressed at the end of its
    prefill; positions and M-RoPE continue across turns as with a plain cache."""
    model = get_model("qwen2_5_vl")
    turns = [visual_inputs(images=1, grid=16, seed=s, text_before=4, question=8) for s in range(3)]
    method = make_method()
    with method.apply(model) as engine:
        sequences, logits, boundaries = converse(model, turns)
        kept = kept_positions(engine.layers)
        report = engine.report
    assert report.compressions == 3 and len(report.extra["later_turns"]) == 2
    assert all(len(head) < boundaries[-1] for layer in kept for head in layer[0])
    ref_sequences, ref_logits, _ = reference_run(model, kept, boundaries, lambda: converse(model, turns))
    assert torch.equal(ref_sequences, sequences)
    assert max((a - b).abs().max().item() for a, b in zip(logits, ref_logits)) < 1e-4
