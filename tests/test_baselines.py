"""H2O, PyramidKV, SparseMM and Quest: selections against references computed here from
transformers' own attention weights / full cache, and exactness at a full budget."""

import pytest
import torch
from conftest import get_model, kept_positions, make_inputs, run_under
from test_exactness import generate
from test_methods import reference_snap_scores, run
from transformers import DynamicCache

from hybridkv import H2O, AdaKV, HeadProfile, ProfileMismatchError, PyramidKV, Quest, SnapKV, SparseMM, profile_heads
from hybridkv.head_profile import model_identity
from hybridkv.methods.pyramidkv import pyramid_budgets
from hybridkv.models.tiny import text_inputs, tiny_model, visual_inputs


def eager_attentions(model, inputs):
    """(layers) x (Hq, L, L) attention weights of transformers' eager path (text or VL model)."""
    config = model.config.get_text_config(decoder=True)
    config._attn_implementation = "eager"
    try:
        out = model(**inputs, output_attentions=True)
    finally:
        config._attn_implementation = "sdpa"
    return [a[0] for a in out.attentions]


def full_keys(model, inputs):
    """(layers) x (Hkv, L, D) prompt keys after RoPE from a plain DynamicCache."""
    cache = DynamicCache()
    model(**inputs, past_key_values=cache, use_cache=True)
    return [layer.keys[0] for layer in cache.layers]


def fake_profile(model, importance):
    """A HeadProfile of ``model`` with the given (layers, kv_heads) importance."""
    static = [[0.5] * len(row) for row in importance]
    types = [["static"] * len(row) for row in importance]
    return HeadProfile(model_identity(model), static, importance, types, {})


# ----------------------------------------------------------------- H2O
@pytest.mark.parametrize("model_type,recent_window", [("llama", 8), ("qwen2_5_vl", 0.5)])
def test_h2o_keeps_recent_window_and_heaviest_column_sums(model_type, recent_window):
    if model_type == "llama":
        model, inputs = tiny_model("llama", layers=2, heads=4, kv_heads=2, seed=3), text_inputs(150, seed=4)
    else:
        model, inputs = get_model("qwen2_5_vl"), visual_inputs(images=2, grid=12, seed=2)
    length = inputs["input_ids"].shape[1]
    budget = 0.2
    n = round(budget * length)
    recent = recent_window if isinstance(recent_window, int) else round(recent_window * n)
    kept = run(model, H2O(budget, recent_window=recent_window), inputs)  # several row blocks
    for layer, attn in enumerate(eager_attentions(model, inputs)):
        hq = attn.shape[0]
        columns = attn.sum(dim=1).view(2, hq // 2, length).mean(dim=1)  # (Hkv, L) attention received
        for h in range(2):
            heavy = columns[h, : length - recent].topk(n - recent).indices.tolist()
            assert kept[layer][h] == sorted(heavy + list(range(length - recent, length)))


# ----------------------------------------------------------------- PyramidKV
def reference_pyramid(layers, tokens, length, window, beta):
    """PyramidKV's schedule written out: arithmetic sequence from bottom to top outside the window."""
    mean = tokens - window
    top, bottom = mean / beta, 2 * mean - mean / beta
    if bottom > length - window:
        bottom = length - window
        top = 2 * mean - bottom
    return [window + int(bottom - (bottom - top) * i / (layers - 1) + 1e-9) for i in range(layers)]


def test_pyramidkv_layer_budgets_decrease_and_keep_top_snap_scores():
    model = tiny_model("llama", layers=4, heads=4, kv_heads=2, seed=3)
    inputs = text_inputs(200, seed=5)
    window, kernel, budget = 8, 5, 0.25
    method = PyramidKV(budget, beta=4, window_size=window, kernel_size=kernel)
    _, report, kept, _ = run_under(model, method, inputs)
    kept = [rows[0] for rows in kept]
    budgets = report.extra["layer_tokens_per_head"]
    assert budgets == reference_pyramid(4, 50, 200, window, 4) == [81, 60, 39, 18]
    assert report.layer_budgets == [2 * b for b in budgets]
    for layer, attn in enumerate(eager_attentions(model, inputs)):
        scores = reference_snap_scores(attn, 2, window, kernel)
        for h in range(2):
            top = scores[h].topk(budgets[layer] - window).indices.tolist()
            assert kept[layer][h] == sorted(top + list(range(200 - window, 200)))


@pytest.mark.parametrize("layers,tokens,length,window,beta", [
    (28, 100, 1000, 64, 20.0), (28, 900, 1000, 64, 20.0), (5, 37, 37, 8, 20.0), (7, 12, 500, 12, 3.0),
    (3, 300, 301, 1, 1.5), (1, 40, 100, 8, 20.0), (6, 50, 100, 8, 1.0),
])
def test_pyramid_budgets_within_total_and_prompt(layers, tokens, length, window, beta):
    b = pyramid_budgets(layers, tokens, length, window, beta)
    assert len(b) == layers
    assert all(x >= y for x, y in zip(b, b[1:]))  # non-increasing with depth
    assert all(window <= x <= length for x in b)
    assert layers * tokens - layers <= sum(b) <= layers * tokens  # the mean is the budget (up to rounding)
    if layers > 1:
        assert b == reference_pyramid(layers, tokens, length, window, beta)
    if tokens == length:
        assert b == [length] * layers


# ----------------------------------------------------------------- SparseMM
def test_sparsemm_splits_the_model_budget_by_importance_and_keeps_top_snap_scores():
    model = tiny_model("llama", layers=2, heads=4, kv_heads=2, seed=3)
    inputs = text_inputs(150, seed=4)
    importance = [[0.0, 0.1], [10.0, 0.3]]
    window, base_share, budget = 8, 0.1, 0.4
    method = SparseMM(budget, profile=fake_profile(model, importance), base_share=base_share, window_size=window)
    _, report, kept, _ = run_under(model, method, inputs)
    kept = [rows[0] for rows in kept]
    n, length = 60, 150
    got = torch.tensor(report.head_budgets).flatten()
    assert got.tolist() == torch.tensor(report.extra["allocated_budgets"]).flatten().tolist()
    # weights: uniform base share + share proportional to importance; head (1, 0) would get more
    # than the prompt, so it keeps everything and the others split the rest proportionally
    imp = torch.tensor(importance).flatten()
    weights = base_share / 4 + (1 - base_share) * imp / imp.sum()
    assert int(got.sum()) == 4 * n
    assert int(got[2]) == length
    rest = 4 * (n - window) - (length - window)
    others = [0, 1, 3]
    expected = rest * weights[others] / weights[others].sum()
    assert bool(((got[others] - window) - expected).abs().lt(1.0).all())
    assert got[0] < got[1] < got[3]
    for layer, attn in enumerate(eager_attentions(model, inputs)):
        scores = reference_snap_scores(attn, 2, window, 5)
        for h in range(2):
            top = scores[h].topk(int(got[layer * 2 + h]) - window).indices.tolist()
            assert kept[layer][h] == sorted(top + list(range(length - window, length)))


def test_sparsemm_refuses_another_models_profile():
    llama = tiny_model("llama", layers=2, seed=3)
    profile = fake_profile(llama, [[1.0, 1.0], [1.0, 1.0]])
    with pytest.raises(ProfileMismatchError, match="made for"):
        SparseMM(0.2, profile=profile).apply(get_model("qwen2"))
    with pytest.raises(ProfileMismatchError, match="made for"):
        SparseMM(0.2, profile=profile).apply(tiny_model("llama", layers=3, seed=3))
    with pytest.raises(TypeError, match="HeadProfile"):
        SparseMM(0.2, profile="profile.json")


# ----------------------------------------------------------------- Quest
def page_bounds_top(keys, q, pages, page_size, count):
    """Reference Quest selection of one layer: per KV head, the ``count`` pages with the highest
    max over the group's query heads of sum_d max(q_d min_d, q_d max_d).

    keys: (Hkv, L, D) prompt keys. q: (Hq, D) the step's queries. Returns {(head, page start)}.
    """
    kv_heads, group = keys.shape[0], q.shape[0] // keys.shape[0]
    chosen = set()
    for h in range(kv_heads):
        bounds = []
        for p in range(pages):
            page = keys[h, p * page_size : (p + 1) * page_size]
            lo, hi = page.min(dim=0).values, page.max(dim=0).values
            qh = q[h * group : (h + 1) * group]
            bounds.append(float(torch.maximum(qh * lo, qh * hi).sum(-1).max()))
        top = sorted(range(pages), key=lambda p: bounds[p], reverse=True)[:count]
        chosen |= {(h, p * page_size) for p in top}
    return chosen


def test_quest_selects_the_top_pages_by_bound_every_step():
    model = tiny_model("llama", layers=2, heads=4, kv_heads=2, seed=3)
    inputs = text_inputs(150, seed=4)
    page_size, budget = 8, 0.3
    pages, partial = 150 // page_size, 150 % page_size
    count = (45 - partial) // page_size
    keys = full_keys(model, inputs)
    method = Quest(budget, page_size=page_size)
    queries = {}
    with torch.inference_mode(), method.apply(model) as engine:
        cache = DynamicCache()
        out = model(**inputs, past_key_values=cache, use_cache=True)
        for idx, layer in enumerate(engine.layers):
            # only the trailing partial page is kept; the pages are pooled with their retrieval slots
            assert kept_positions([layer])[0][0] == [list(range(150 - partial, 150))] * 2
            layer.observer = lambda q, lay, idx=idx: queries.__setitem__(idx, q[0, :, -1].clone())
        for _ in range(3):
            out = model(input_ids=out.logits[:, -1:].argmax(-1), past_key_values=cache, use_cache=True)
            for idx, layer in enumerate(engine.layers):
                pool = layer.retriever
                got = {(h, int(pool.positions[0, p, m, 0]))
                       for p, h in enumerate(pool.heads[0].tolist()) for m in pool.last_picks[p].tolist()}
                assert got == page_bounds_top(keys[idx], queries[idx], pages, page_size, count)
        extra = engine.report.extra
    assert (extra["pages_per_head"], extra["pages_per_step"], extra["partial_page_tokens"]) == (pages, count, partial)


def test_quest_host_store_keeps_every_page_and_dense_layers_attend_all():
    model = tiny_model("llama", layers=2, heads=4, kv_heads=2, seed=3)
    inputs = text_inputs(150, seed=4)
    method = Quest(0.3, page_size=16, store="host", dense_layers=1)
    with method.apply(model) as engine:
        model.generate(**inputs, max_new_tokens=3, do_sample=False)
        dense, paged = engine.layers
        assert dense.retriever is None and kept_positions([dense])[0][0] == [list(range(150))] * 2
        assert kept_positions([paged])[0][0] == [list(range(150 - 150 % 16, 150))] * 2
        assert paged.retriever.keys.device.type == "cpu"
    head_dim = 16
    assert method.report.offloaded_kv_bytes == 2 * 2 * (150 // 16) * 16 * head_dim * 4  # K and V of every page, fp32


# ----------------------------------------------------------------- budget 1.0 == plain generate
@pytest.fixture(scope="module")
def profiles():
    """Profiles of the two exactness models from the project's own profiler."""
    return {
        "qwen2_5_vl": profile_heads(get_model("qwen2_5_vl"), [visual_inputs(grid=8, seed=7)], decode_tokens=2),
        "llama": profile_heads(get_model("llama"), [text_inputs(80, seed=7)], decode_tokens=2),
    }


METHODS = {
    "H2O": lambda profile: H2O(1.0),
    "PyramidKV": lambda profile: PyramidKV(1.0, window_size=8),
    "SparseMM": lambda profile: SparseMM(1.0, profile=profile, window_size=8),
    "Quest-16": lambda profile: Quest(1.0, page_size=16),
    "Quest-8": lambda profile: Quest(1.0, page_size=8),
}


@pytest.mark.parametrize("name", METHODS)
@pytest.mark.parametrize("model_type,kind", [("qwen2_5_vl", "image"), ("llama", "text")])
def test_full_budget_matches_plain_generate(model_type, kind, name, profiles):
    model, inputs = get_model(model_type), make_inputs(kind)
    ref = generate(model, inputs)
    method = METHODS[name](profiles[model_type])
    out = generate(model, inputs, method)
    assert torch.equal(out.sequences, ref.sequences)
    assert max((a - b).abs().max().item() for a, b in zip(out.logits, ref.logits)) < 1e-4
    report = method.report
    length = report.prompt_tokens
    if name.startswith("Quest"):  # every page is attended at every step, none is evicted
        assert report.extra["pages_per_step"] == report.extra["pages_per_head"] == length // method.page_size
        assert report.attended_tokens_per_step > length
    else:
        assert all(n == length for layer in report.head_budgets for n in layer)


# ----------------------------------------------------------------- parameters
@pytest.mark.parametrize("make,error", [
    (lambda: H2O(0.1, recent_window=1.5), ValueError),
    (lambda: H2O(0.1, recent_window=-1), ValueError),
    (lambda: H2O(0.1, recent_window="8"), TypeError),
    (lambda: AdaKV(0.1, kernel_size=4), ValueError),
    (lambda: AdaKV(0.1, window_size=0), ValueError),
    (lambda: SnapKV(0.1, window_size=0), ValueError),
    (lambda: AdaKV(0.1, alpha_safeguard=2.0), ValueError),
    (lambda: PyramidKV(0.1, beta=0.5), ValueError),
    (lambda: PyramidKV(0.1, kernel_size=4), ValueError),
    (lambda: SparseMM(0.1, profile=None), TypeError),
    (lambda: SparseMM(0.1, window_size=4), TypeError),
    (lambda: Quest(0.1, page_size=0), ValueError),
    (lambda: Quest(0.1, store="disk"), ValueError),
    (lambda: Quest(0.1, dense_layers=-1), ValueError),
    (lambda: Quest(1.5), ValueError),
])
def test_bad_parameters_are_clear_errors(make, error):
    with pytest.raises(error):
        make()


def test_sparsemm_base_share_is_validated():
    profile = fake_profile(tiny_model("llama", layers=2, seed=3), [[1.0, 1.0], [1.0, 1.0]])
    with pytest.raises(ValueError, match="base_share"):
        SparseMM(0.1, profile=profile, base_share=1.5)
