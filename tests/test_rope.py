"""Keys rotated back with the rotation the engine hands a method are the keys before RoPE.

The reference is read from the model itself, independently of the engine and of the rotation
tensors: a forward hook on each attention module's last projection before RoPE (``k_norm``
where the architecture has one, else ``k_proj``) records the keys before they are rotated.
"""

from dataclasses import dataclass, field

import pytest
import torch
from conftest import CASES, get_model, make_inputs
from test_positions import left_padded
from transformers.models.qwen2.modeling_qwen2 import apply_rotary_pos_emb
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_multimodal_rotary_pos_emb

from hybridkv.decisions import Decision, LayerContext, Plan
from hybridkv.harness import capture_prefill
from hybridkv.methods.base import Method
from hybridkv.models.architectures import attention_modules
from hybridkv.models.tiny import text_inputs
from hybridkv.rope import derotate, token_rotation


@dataclass(eq=False, kw_only=True)
class _Record(Method):
    """Keeps everything; records each compressed segment's keys and rotation."""

    budget: float = 1.0
    seen: list = field(default_factory=list, repr=False)

    def compress(self, ctx: LayerContext, plan: Plan) -> Decision:
        self.seen.append((ctx.layer_idx, ctx.keys, ctx.rotation))
        return Decision(torch.ones(ctx.keys.shape[:2], dtype=torch.bool, device=ctx.keys.device))


def keys_before_rope(model, run) -> list[torch.Tensor]:
    """Per layer, the (B, Hkv, L, D) keys of the first forward ``run()`` makes, before RoPE."""
    out: list = []
    hooks = []
    for module in attention_modules(model):
        source = getattr(module, "k_norm", None) or module.k_proj
        dim = module.head_dim

        def hook(_, __, output, dim=dim):
            if len(out) < len(hooks):
                out.append(output.reshape(*output.shape[:2], -1, dim).transpose(1, 2).float())

        hooks.append(source.register_forward_hook(hook))
    try:
        run()
    finally:
        for handle in hooks:
            handle.remove()
    return out


def test_derotate_inverts_transformers_rope():
    gen = torch.Generator().manual_seed(0)
    keys = torch.randn(1, 2, 9, 16, generator=gen)
    angles = torch.randint(0, 5000, (1, 9, 1), generator=gen).float() * 1e4 ** (-torch.arange(0, 16, 2) / 16)
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)  # (1, 9, 16)
    _, rotated = apply_rotary_pos_emb(keys, keys, cos, sin)
    assert not torch.allclose(rotated, keys, atol=1e-3)
    turn = token_rotation(cos, sin)
    torch.testing.assert_close(derotate(rotated[0], turn[0][0], turn[1][0]), keys[0], rtol=1e-5, atol=1e-5)


def test_multimodal_rotation_is_combined_per_section():
    gen = torch.Generator().manual_seed(1)
    section = (2, 3, 3)
    keys = torch.randn(1, 2, 7, 16, generator=gen)
    positions = torch.randint(0, 300, (3, 1, 7, 1), generator=gen).float()  # (time, row, column) differ
    angles = positions * 1e4 ** (-torch.arange(0, 16, 2) / 16)
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)  # (3, 1, 7, 16)
    _, rotated = apply_multimodal_rotary_pos_emb(keys, keys, cos, sin, list(section))
    turn = token_rotation(cos, sin, section)
    assert turn[0].shape == (1, 7, 16)
    torch.testing.assert_close(derotate(rotated[0], turn[0][0], turn[1][0]), keys[0], rtol=1e-5, atol=1e-5)
    assert token_rotation(cos, sin, (2, 3, 2)) is None  # sections that do not cover the head


def test_a_rotation_not_in_rotate_half_form_is_refused():
    cos = torch.rand(1, 5, 8)
    assert token_rotation(cos, cos.clone()) is None
    assert token_rotation(cos[..., :4].repeat(1, 1, 2), cos[..., :4].repeat(1, 1, 2)) is not None


@pytest.mark.parametrize("model_type,kind", CASES, ids=[f"{m}-{k}" for m, k in CASES])
def test_every_architecture_hands_methods_the_rotation_of_its_prompt_keys(model_type, kind):
    model, inputs = get_model(model_type), make_inputs(kind, model_type=model_type)
    method = _Record()

    def run():
        with torch.no_grad(), method.apply(model, query_tokens=12 if kind == "text" else None):
            model.generate(**inputs, max_new_tokens=1, do_sample=False)

    before = keys_before_rope(model, run)
    assert len(method.seen) == len(before)
    for idx, keys, rotation in method.seen:
        assert rotation is not None, idx
        reference = before[idx][0]
        assert not torch.allclose(keys.float(), reference, atol=1e-3)  # RoPE did move the cached keys
        torch.testing.assert_close(derotate(keys, *rotation), reference, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("model_type", ["qwen2", "qwen2_5_vl"])
def test_rows_of_a_left_padded_batch_get_their_own_rotation(model_type):
    model = get_model(model_type)
    prompts = [text_inputs(40, seed=7), text_inputs(65, seed=8)]
    method = _Record()

    def run():
        with torch.no_grad(), method.apply(model, query_tokens=8):
            model.generate(**left_padded(prompts), max_new_tokens=1, do_sample=False)

    before = keys_before_rope(model, run)
    pad = 65 - 40
    rows = [method.seen[i::2] for i in range(2)]  # the engine compresses row 0 then row 1 per layer
    for b, row in enumerate(rows):
        for idx, keys, rotation in row:
            reference = before[idx][b][:, pad if b == 0 else 0 :]
            torch.testing.assert_close(derotate(keys, *rotation), reference, rtol=1e-4, atol=1e-4)


def test_a_later_turn_has_no_rotation_and_the_shared_prefill_keeps_it():
    model = get_model("qwen2")
    inputs = text_inputs(80, seed=9)
    method = _Record()
    with torch.no_grad(), method.apply(model, query_tokens=8, min_turn_tokens=16):
        first = model.generate(**inputs, max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
        turn = torch.cat([first.sequences, text_inputs(40, seed=10)["input_ids"]], dim=1)
        model.generate(input_ids=turn, attention_mask=torch.ones_like(turn), past_key_values=first.past_key_values,
                       max_new_tokens=1, do_sample=False)
    layers = len(attention_modules(model))
    assert len(method.seen) == 2 * layers
    assert all(rotation is not None for _, _, rotation in method.seen[:layers])
    assert all(rotation is None for _, _, rotation in method.seen[layers:])  # its segment holds decoded tokens
    capture = capture_prefill(model, inputs, query_tokens=8)
    torch.testing.assert_close(capture.rotation[0], method.seen[0][2][0])
    torch.testing.assert_close(capture.rotation[1], method.seen[0][2][1])


def test_rows_of_a_batch_that_share_positions_share_one_rotation():
    """A batch forward without a padding mask gets one (1, L, D) rotation for all its rows."""
    model = get_model("llama")
    ids = torch.cat([text_inputs(50, seed=11)["input_ids"], text_inputs(50, seed=12)["input_ids"]])
    method = _Record()

    def run():
        with torch.no_grad(), method.apply(model, query_tokens=8):
            model(input_ids=ids, use_cache=True)

    before = keys_before_rope(model, run)
    assert len(method.seen) == 2 * len(before)
    for i, (idx, keys, rotation) in enumerate(method.seen):
        torch.testing.assert_close(derotate(keys, *rotation), before[idx][i % 2], rtol=1e-4, atol=1e-4)
