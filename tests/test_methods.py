"""Each method keeps what its definition says, checked against references computed here."""

import torch.nn.functional as F
from conftest import run_under

from hybridkv import AdaKV, SnapKV, StreamingLLM
from hybridkv.models.tiny import text_inputs, tiny_model


def eager_attentions(model, inputs):
    """(layers) x (Hq, L, L) attention weights from transformers' eager path."""
    model.config._attn_implementation = "eager"
    try:
        out = model(**inputs, output_attentions=True)
    finally:
        model.config._attn_implementation = "sdpa"
    return [a[0] for a in out.attentions]


def run(model, method, inputs):
    """Per layer, per KV head: sorted kept prompt positions of one sequence."""
    return [rows[0] for rows in run_under(model, method, inputs)[2]]


def reference_snap_scores(attn, kv_heads, window, kernel):
    """SnapKV scores from full attention weights (Hq, L, L): (Hkv, L - window)."""
    hq, length, _ = attn.shape
    scores = attn[:, length - window :, : length - window].mean(dim=1)  # (Hq, L-w)
    scores = F.avg_pool1d(scores[:, None], kernel, stride=1, padding=kernel // 2)[:, 0]
    return scores.view(kv_heads, hq // kv_heads, -1).mean(dim=1)


def test_snapkv_keeps_window_and_top_pooled_attention():
    model = tiny_model("llama", layers=2, heads=4, kv_heads=2, seed=3)
    inputs = text_inputs(150, seed=4)
    window, kernel, budget = 16, 5, 0.2
    kept = run(model, SnapKV(budget, window_size=window, kernel_size=kernel), inputs)
    n = round(budget * 150)
    for layer, attn in enumerate(eager_attentions(model, inputs)):
        scores = reference_snap_scores(attn, 2, window, kernel)
        for h in range(2):
            top = scores[h].topk(n - window).indices.tolist()
            assert kept[layer][h] == sorted(top + list(range(150 - window, 150)))


def test_adakv_shares_layer_budget_with_safeguard():
    model = tiny_model("llama", layers=2, heads=4, kv_heads=2, seed=3)
    inputs = text_inputs(150, seed=4)
    window, budget, alpha = 4, 0.2, 0.4
    kept = run(model, AdaKV(budget, alpha_safeguard=alpha, window_size=window), inputs)
    n = round(budget * 150)
    for layer, attn in enumerate(eager_attentions(model, inputs)):
        scores = reference_snap_scores(attn, 2, window, 5)
        assert sum(len(h) for h in kept[layer]) == 2 * n
        # each head's safeguard is its window plus its best tokens up to alpha * n; the rest of
        # the layer's 2n slots go to the best remaining scores of either head
        floor = int(alpha * n)
        chosen = set()
        for h in range(2):
            assert all(p in kept[layer][h] for p in range(150 - window, 150))
            chosen |= {(h, p) for p in scores[h].topk(floor - window).indices.tolist()}
        rest = sorted(((scores[h, p].item(), h, p) for h in range(2) for p in range(150 - window)
                       if (h, p) not in chosen), reverse=True)
        chosen |= {(h, p) for _, h, p in rest[: 2 * n - 2 * window - len(chosen)]}
        for h in range(2):
            expected = sorted([p for hh, p in chosen if hh == h] + list(range(150 - window, 150)))
            assert kept[layer][h] == expected


def test_streaming_llm_keeps_sinks_and_recent():
    model = tiny_model("qwen2", seed=1)
    kept = run(model, StreamingLLM(20, sink_tokens=4), text_inputs(100))
    expected = list(range(4)) + list(range(84, 100))
    assert all(head == expected for layer in kept for head in layer)
