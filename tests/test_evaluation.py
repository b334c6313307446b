"""The quality harness: rows per (task, method, budget), resumable store, tables."""

import json

import pytest
import torch
from conftest import get_model

from hybridkv.data.text_tasks import TextTask, answer_correct
from hybridkv.evaluation import evaluate
from hybridkv.methods import make_method
from hybridkv.result_store import ResultStore
from hybridkv.tables import markdown_table, summarize


class DigitTokenizer:
    """Decodes ids as their last digit: enough to score tiny random models' outputs."""

    eos_token_id = None

    def decode(self, ids, skip_special_tokens=True):
        return "".join(str(int(i) % 10) for i in ids)


def tiny_task(seed: int) -> TextTask:
    ids = torch.randint(1, 1000, (1, 90), generator=torch.Generator().manual_seed(seed))
    return TextTask("needle", 90, 0.5, seed, ids, 10, "12345")


def test_evaluate_writes_rows_and_resumes(tmp_path):
    model = get_model("llama")
    store = ResultStore(tmp_path / "q.jsonl")
    tasks = [tiny_task(0), tiny_task(1)]
    evaluate(model, DigitTokenizer(), "tiny", tasks, store, ["SnapKV", "HybridKV:pool=None"], [0.5], progress=False,
             max_new_tokens=4)
    lines = (tmp_path / "q.jsonl").read_text().splitlines()
    assert len(lines) == 2 * 3  # FullKV + two methods per task
    rows = [json.loads(line) for line in lines]
    full = [r for r in rows if r["method"] == "FullKV"]
    assert all(r["prefix_agreement"] == 1.0 and r["kl"] == 0.0 for r in full)
    assert all(0.0 <= r["prefix_agreement"] <= 1.0 and r["kl"] >= 0.0 for r in rows)
    # a rerun finds everything done and writes nothing
    evaluate(model, DigitTokenizer(), "tiny", tasks, ResultStore(tmp_path / "q.jsonl"), ["SnapKV", "HybridKV:pool=None"],
             [0.5], progress=False, max_new_tokens=4)
    assert len((tmp_path / "q.jsonl").read_text().splitlines()) == 6
    table = summarize(rows, "tiny")
    assert {(r["method"], r["prompts"]) for r in table} == {("FullKV", 2), ("SnapKV", 2), ("HybridKV:pool=None", 2)}
    assert "| FullKV |" in markdown_table(table)
    # rows written for another prompt under the same task key are refused, not resumed
    lines[0] = json.dumps({**rows[0], "prompt_tokens": rows[0]["prompt_tokens"] + 1})
    (tmp_path / "changed.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match="the prompt changed"):
        evaluate(model, DigitTokenizer(), "tiny", tasks, ResultStore(tmp_path / "changed.jsonl"), ["SnapKV"], [0.5],
                 progress=False, max_new_tokens=4)
    full_only = markdown_table(summarize(full, "tiny")).splitlines()
    assert full_only[0] == "| method | 1.0 | prompts |" and full_only[1] == "|---|---|---|"
    assert full_only[2] == f"| FullKV | {table[0]['accuracy']} | 2 |"


def test_store_refuses_a_malformed_line(tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_text('{"model": "m", "task": "t", "method": "x", "budget": 0.1}\nnot json\n')
    with pytest.raises(ValueError, match="q.jsonl:2"):
        ResultStore(path)


def test_method_names_and_options():
    method = make_method("HybridKV:pool=4,store=host", 0.1)
    assert (method.pool, method.store, method.budget) == (4, "host", 0.1)
    with pytest.raises(ValueError, match="needs a head profile"):
        make_method("SparseMM", 0.1)
    with pytest.raises(ValueError, match="unknown method"):
        make_method("Magic", 0.1)


def test_answer_checking():
    assert answer_correct(" 48213. Remember", "48213")
    assert not answer_correct(" 4821", "48213")
    assert not answer_correct(" none", "48213")


def test_budget_below_the_protected_minimum_is_a_number_marked_exceeded(tmp_path):
    """HybridKV keeps the question, sinks and window: 5% of a 90-token prompt with a 10-token
    question cannot hold them, so it keeps them anyway, the row says by how much the budget was
    exceeded, and the table marks the cell instead of leaving it empty."""
    store = ResultStore(tmp_path / "q.jsonl")
    evaluate(get_model("llama"), DigitTokenizer(), "tiny", [tiny_task(0)], store, ["SnapKV", "HybridKV"], [0.05],
             progress=False, max_new_tokens=2)
    rows = {r["method"]: r for r in store.rows.values()}
    assert rows["HybridKV"]["budget_exceeded_tokens"] > 0 and rows["HybridKV"]["correct"] in (True, False)
    assert rows["SnapKV"]["budget_exceeded_tokens"] == 0
    table = summarize(store.rows.values(), "tiny")
    hybrid = next(r for r in table if r["method"] == "HybridKV")
    assert (hybrid["prompts"], hybrid["budget_exceeded"]) == (1, 1.0)
    assert f"| HybridKV | {hybrid['accuracy']}* |" in markdown_table(table)


def test_kvpress_peers_refuse_visual_tasks_with_a_tail(tmp_path):
    from hybridkv.models.tiny import visual_inputs

    class Visual(TextTask):
        def inputs(self):
            return visual_inputs(images=1)

    task = Visual("needle", 90, 0.5, 0, tiny_task(0).input_ids, 10, "12345", tail_tokens=3)
    with pytest.raises(ValueError, match="without --peers"):
        evaluate(get_model("qwen2_5_vl"), DigitTokenizer(), "tiny", [task], ResultStore(tmp_path / "q.jsonl"), ["SnapKV"],
                 [0.5], peers=["kvpress:SnapKV"], progress=False)


def test_kvpress_peers_run_on_a_vlm_with_1d_positions():
    """LLaVA-OneVision gives visual tokens 1-D positions, so kvpress's tail path applies: with a press
    that compresses nothing it answers what plain ``generate()`` answers."""
    import contextlib

    from conftest import make_inputs

    from hybridkv.evaluation import _kvpress_after_tail

    model = get_model("llava_onevision")
    inputs = make_inputs("multi_image", model_type="llava_onevision")
    with torch.inference_mode():
        plain = model.generate(**inputs, max_new_tokens=4, do_sample=False, min_new_tokens=4)[0, inputs["input_ids"].shape[1]:]
        tokens = _kvpress_after_tail(model, contextlib.nullcontext, inputs, 3, 4, ())
    assert tokens.tolist() == plain.tolist()


def test_evaluation_runs_kvpress_peers_on_a_vlm_with_1d_positions(tmp_path):
    """Under a real press (kvpress, the benchmark extra) the evaluation stores the peer's row beside ours."""
    pytest.importorskip("kvpress")
    from conftest import make_inputs

    model = get_model("llava_onevision")
    inputs = make_inputs("multi_image", model_type="llava_onevision")

    class Visual(TextTask):
        def inputs(self):
            return inputs

    ids = inputs["input_ids"]
    task = Visual("needle", ids.shape[1], 0.5, 0, ids, 10, "1", tail_tokens=3)
    store = ResultStore(tmp_path / "v.jsonl")
    evaluate(model, DigitTokenizer(), "tiny", [task], store, ["SnapKV"], [0.5], peers=["kvpress:SnapKV"], progress=False,
             max_new_tokens=2)
    assert {r["method"] for r in store.rows.values()} == {"FullKV", "SnapKV", "kvpress:SnapKV"}


def test_kvpress_tail_path_continues_positions_like_a_full_forward():
    """The question-agnostic peer path (prefix under the press, then tail and answer at explicit
    positions): with a press that compresses nothing, its logits at every step equal one full
    forward over the prompt and the answer (positions continue right); with a press that drops
    cache entries they differ (the path reads the cache it was given)."""
    import contextlib

    from hybridkv.evaluation import _kvpress_after_tail

    model = get_model("llama")
    ids = tiny_task(0).input_ids

    def run(press):
        seen = []
        handle = model.lm_head.register_forward_hook(lambda m, a, out: seen.append(out[0, -1].clone()))
        try:
            with torch.inference_mode():
                tokens = _kvpress_after_tail(model, press, {"input_ids": ids}, 12, 6, ())
        finally:
            handle.remove()
        return tokens, torch.stack(seen)

    tokens, logits = run(contextlib.nullcontext)
    with torch.inference_mode():
        full = model(torch.cat([ids, tokens[None, :-1]], dim=1)).logits[0, 89:]
    torch.testing.assert_close(logits, full, atol=1e-4, rtol=1e-4)

    @contextlib.contextmanager
    def drop_half(m):
        def hook(module, args, kwargs, output):
            if kwargs["hidden_states"].shape[1] > 1 and kwargs["past_key_values"] is not None:
                layer = kwargs["past_key_values"].layers[module.layer_idx]
                layer.keys, layer.values = layer.keys[:, :, ::2], layer.values[:, :, ::2]
        handles = [layer.self_attn.register_forward_hook(hook, with_kwargs=True) for layer in m.model.layers]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    _, dropped = run(drop_half)
    assert (dropped[0] - full[0]).abs().max() > 1e-3
