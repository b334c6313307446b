"""RULER tasks: deterministic, of the asked length, their references really in the prompt and right."""

import re
from collections import Counter

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from hybridkv.cli import _text_tasks, build_parser
from hybridkv.data.ruler import MAX_NEW_TOKENS, NOISE_WORD, RULER_TASKS, RulerBuilder, ruler_tasks
from hybridkv.data.text_tasks import corpus_text

NEEDLE = re.compile(r"One of the special magic numbers for (\S+) is: (\d{7})\.")


class CharTokenizer:
    """One id per character: lengths and positions the test can reason about exactly."""

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) for c in text]}

    def decode(self, ids):
        return "".join(chr(i) for i in ids)


def bpe_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE (1000 ids) trained on the corpus: merges across pieces like a real model's tokenizer."""
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1000, show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    core.train_from_iterator([corpus_text()], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=core)


LENGTHS = {"char": (3000, 8000), "bpe": (2000, 4096)}  # both sides of common_words' 4096-token switch


@pytest.fixture(scope="module", params=list(LENGTHS))
def builder(request) -> RulerBuilder:
    return RulerBuilder(CharTokenizer() if request.param == "char" else bpe_tokenizer())


@pytest.fixture(scope="module")
def chars() -> RulerBuilder:
    return RulerBuilder(CharTokenizer())


def lengths(builder: RulerBuilder) -> tuple[int, ...]:
    return LENGTHS["char" if isinstance(builder.tokenizer, CharTokenizer) else "bpe"]


def parts(builder: RulerBuilder, task) -> tuple[str, str]:
    """(context between the instruction and the question, trailing question)."""
    ids = task.input_ids[0].tolist()
    before, question = builder.tokenizer.decode(ids[: -task.query_tokens]), builder.tokenizer.decode(ids[-task.query_tokens :])
    return before.split("\n\n", 1)[1], question


def resolve(assigned: dict[str, str], name: str) -> str:
    """The value a variable holds by following ``VAR X = VAR Y`` assignments."""
    target = assigned[name]
    return resolve(assigned, target[4:]) if target.startswith("VAR ") else target


@pytest.mark.parametrize("name", RULER_TASKS)
def test_length_question_and_references(builder, name):
    for length in lengths(builder):
        task = getattr(builder, name)(length, 0)
        size = task.input_ids.shape[1]
        assert 0.9 * length <= size <= length
        if name.startswith("niah") or name == "variable_tracking":
            assert size == length
        context, question = parts(builder, task)
        tail = task.input_ids[0, -task.query_tokens :].tolist()
        assert builder.tokenizer(question, add_special_tokens=False)["input_ids"] == tail
        assert question.startswith("\n\nQuestion:") and "\nAnswer:" in question and "Question:" not in context
        assert all(ref in context for ref in task.references) and task.references
        assert task.max_new_tokens == MAX_NEW_TOKENS[name] and task.tail_tokens == 0 and task.kind == name
        assert task.key == f"ruler-{name}-L{length}-s0" and task.answer == ", ".join(task.references)


@pytest.mark.parametrize("name", RULER_TASKS)
def test_deterministic_per_seed(chars, name):
    a, b, c = (getattr(chars, name)(3000, seed) for seed in (5, 5, 6))
    assert a.input_ids.equal(b.input_ids) and a.references == b.references and a.depth == b.depth
    assert a.references != c.references and not (a.input_ids.shape == c.input_ids.shape and a.input_ids.equal(c.input_ids))


def test_needles_and_what_is_asked(chars):
    single = chars.niah_single(3000, 1)
    context, question = parts(chars, single)
    ((key, value),) = NEEDLE.findall(context)
    assert single.references == (value,) and f"number for {key} mentioned" in question
    assert abs(context.index("One of the special") / len(context) - single.depth) < 0.01

    multikey = chars.niah_multikey(3000, 1)
    context, question = parts(chars, multikey)
    needles = dict(NEEDLE.findall(context))
    asked = re.search(r"number for (\S+) mentioned", question).group(1)
    assert len(needles) == 4 and multikey.references == (needles[asked],)

    multivalue = chars.niah_multivalue(3000, 1)
    context, question = parts(chars, multivalue)
    found = NEEDLE.findall(context)
    assert len(found) == 4 and len({k for k, _ in found}) == 1 and {v for _, v in found} == set(multivalue.references)
    assert f"numbers for {found[0][0]} mentioned" in question

    multiquery = chars.niah_multiquery(3000, 1)
    context, question = parts(chars, multiquery)
    found = NEEDLE.findall(context)
    assert len({k for k, _ in found}) == 4 and {v for _, v in found} == set(multiquery.references)
    assert all(k in question for k, _ in found)


def test_variable_chain_resolves_to_the_value(builder):
    for length in lengths(builder):
        task = builder.variable_tracking(length, 2)
        context, question = parts(builder, task)
        value = re.search(r"assigned the value (\d{5})", question).group(1)
        assigned = dict(re.findall(r"VAR ([A-Z]{5}) = ((?:VAR [A-Z]{5})|\d{5})\n", context))
        assert len(assigned) == 5 and len(task.references) == 5
        assert {name for name in assigned if resolve(assigned, name) == value} == set(task.references)
        assert context.count("The grass is green.") > 5


def test_common_words_are_the_most_common_listed(builder):
    for length in lengths(builder):
        task = builder.common_words(length, 3)
        context, _ = parts(builder, task)
        entries = re.findall(r"(\d+)\. ([a-z]+)", context)
        assert [int(i) for i, _ in entries] == list(range(1, len(entries) + 1))
        counts = Counter(word for _, word in entries).most_common()
        assert {w for w, _ in counts[:10]} == set(task.references) and counts[9][1] > counts[10][1]
        assert counts[0][1] == (30 if length >= 4096 else 6)


def test_frequent_words_are_the_most_frequent_coded_words(builder):
    for length in lengths(builder):
        task = builder.frequent_words(length, 4)
        context, _ = parts(builder, task)
        counts = Counter(context.split()).most_common()
        assert counts[0][0] == NOISE_WORD
        coded = counts[1:]
        assert {w for w, _ in coded[:3]} == set(task.references) and coded[2][1] > coded[3][1]


def test_score_is_the_share_of_references_found(chars):
    task = chars.niah_multivalue(3000, 0)
    refs = task.references
    assert task.score(", ".join(refs)) == 1.0 and task.is_correct(" and ".join(reversed(refs)))
    assert task.score(f"first {refs[0]}, then {refs[2]}") == 0.5 and not task.is_correct(refs[0])
    assert task.score("no idea") == 0.0
    chain = chars.variable_tracking(3000, 0)
    assert chain.score(" ".join(r.lower() for r in chain.references)) == 1.0
    assert chain.inputs()["attention_mask"].shape == chain.input_ids.shape


def test_clear_errors(chars):
    for name in RULER_TASKS:
        with pytest.raises(ValueError, match=name):
            getattr(chars, name)(60, 0)
    with pytest.raises(ValueError, match="distinct words"):
        chars.common_words(200_000, 0)
    with pytest.raises(ValueError, match="unknown RULER tasks"):
        ruler_tasks(CharTokenizer(), ["niah_single", "qa"], [3000], [0])


def test_eval_command_expands_ruler_tasks():
    args = build_parser().parse_args(["eval", "--model", "m", "--task", "ruler", "ruler-variable_tracking", "needle"])
    tasks = _text_tasks(CharTokenizer(), args.task, [3000], [0.5], [0, 1])
    assert [t.kind for t in tasks] == ["needle"] * 2 + [k for k in RULER_TASKS for _ in range(2)]
    with pytest.raises(SystemExit):
        build_parser().parse_args(["eval", "--model", "m", "--task", "ruler-qa"])


def test_question_after_feeds_the_question_as_the_tail(chars):
    """Question-agnostic RULER: the same prompt, its question (with the answer prefix) fed after compression,
    no question span in the compressed prefix, its own result key; the protocol is checked."""
    aware = ruler_tasks(CharTokenizer(), ["niah_multikey"], [3000], [0])[0]
    agnostic = ruler_tasks(CharTokenizer(), ["niah_multikey"], [3000], [0], protocol="question-after")[0]
    assert agnostic.input_ids.tolist() == aware.input_ids.tolist() and agnostic.references == aware.references
    assert (agnostic.tail_tokens, agnostic.query_tokens, aware.tail_tokens) == (aware.query_tokens, 0, 0)
    question = chars.tokenizer.decode(agnostic.input_ids[0, -agnostic.tail_tokens :].tolist())
    assert question.startswith("\n\nQuestion:") and agnostic.key == aware.key + "-qafter"
    with pytest.raises(ValueError, match="unknown protocol"):
        ruler_tasks(CharTokenizer(), ["niah_single"], [3000], [0], protocol="question-first")
    with pytest.raises(SystemExit, match="applies to RULER"):
        _text_tasks(CharTokenizer(), ["needle"], [3000], [0.5], [0], protocol="question-after")


def _benchmark_module(name: str):
    """The module ``benchmarks/<name>.py`` (benchmarks are scripts, not a package)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_summary_compares_partial_methods_on_their_own_prompts():
    """benchmarks/ruler.py: a method run on under 90% of a column's prompts gets a sub-column over
    the prompts it has (beside every other method there), and does not shrink the main column; a
    method short of one prompt of ten does, so every mean in a column is over the same prompts."""
    ruler_benchmark = _benchmark_module("ruler")

    def row(seed, method, score):
        return {"task": f"ruler-niah_single-L4096-s{seed}-qafter", "kind": "niah_single", "length": 4096,
                "method": method, "budget": 1.0 if method == "FullKV" else 0.1, "score": score}

    rows = [row(s, "FullKV", 1.0) for s in range(10)] + [row(s, "A", float(s % 2 == 0)) for s in range(10)]
    rows += [row(s, "B", 1.0) for s in range(9)] + [row(9, "Peer", 0.0)] + [row(s, "Peer2", 1.0) for s in (0, 9)]
    rows += [row(s, "Peer3", 1.0) for s in range(8)]
    table, _ = ruler_benchmark.summary(rows, 0.1)
    cell = {(r["method"], r["column"]): (r["score"], r["prompts"]) for r in table}
    assert cell[("A", "4k agnostic")] == (55.6, 9)  # seeds 0-8: B has no seed 9
    assert not any((peer, "4k agnostic") in cell for peer in ("Peer", "Peer2", "Peer3"))
    assert cell[("Peer", "4k agnostic, 1 prompts")] == (0.0, 1)
    assert cell[("A", "4k agnostic, 1 prompts")] == (0.0, 1) and cell[("FullKV", "4k agnostic, 1 prompts")] == (100.0, 1)
    assert ("B", "4k agnostic, 1 prompts") not in cell and ("Peer2", "4k agnostic, 1 prompts") in cell
    assert cell[("Peer2", "4k agnostic, 2 prompts")] == (100.0, 2) and cell[("A", "4k agnostic, 2 prompts")] == (50.0, 2)
    assert ("Peer", "4k agnostic, 2 prompts") not in cell
    assert cell[("Peer3", "4k agnostic, 8 prompts")] == (100.0, 8) and cell[("A", "4k agnostic, 8 prompts")] == (50.0, 8)


def test_retention_diagnostic_counts_static_heads_keeping_a_reference():
    """benchmarks/ruler_retention.py: a reference's token run is found in the prompt, and static
    heads are counted by how much of it (and of the tokens before it) they keep; dynamic heads are
    left out."""
    retention = _benchmark_module("ruler_retention")
    assert retention.token_span([5, 1, 2, 3, 1, 2], [1, 2]) == [1, 2]
    assert retention.token_span([5, 1, 3], [1, 2]) == []
    span = [20, 21, 22, 23]  # the 12 tokens before it: 8..19
    kept = [[set(range(0, 30)), {20, 21}], [set(range(14, 24)), set(range(30))]]
    types = [["static", "static"], ["static", "dynamic"]]
    out = retention.retention(kept, types, span)
    assert out == {"static_heads": 3, "heads_keeping_all": 2, "mean_share": round((1 + 0.5 + 1) / 3, 3),
                   "key_share": round((1 + 0 + 6 / 12) / 3, 3)}


@pytest.mark.parametrize("share,consensus", [(0.0, 0.0), (0.5, 0.0), (0.5, 0.5)])
def test_retention_diagnostic_reads_the_ranking_hybridkv_compressed_by(share, consensus):
    """The position bias is measured on the scores HybridKV ranked each layer's tokens by while
    compressing (one (Hkv, S) ranking per layer; at ``derotate_share`` 0.5 the union ranking, with
    the model-wide ranking its union with that), and per eighth of the prompt it is the mean
    percentile of those scores."""
    import torch

    from hybridkv import HybridKV
    from hybridkv.models.tiny import tiny_model, visual_inputs

    retention = _benchmark_module("ruler_retention")
    ascending = torch.arange(16.0)[None]  # one head, scores rising with position
    assert retention.position_bias([ascending, ascending]) == [round((4 * i + 1) / 32, 3) for i in range(8)]
    model = tiny_model("qwen2_5_vl", hidden_size=64, heads=4, kv_heads=2, seed=5)
    inputs = visual_inputs(images=2, grid=16, question=0, seed=6)  # no question: key diversity ranks
    method = HybridKV(0.3, max_dynamic_share=0.0, derotate_share=share, consensus_share=consensus)
    rankings = retention.record_rankings(method)
    with method.apply(model) as engine:
        model.generate(**inputs, max_new_tokens=1, do_sample=False)
        kept = [layer.kept_positions[0] for layer in engine.layers]
    length = inputs["input_ids"].shape[1]
    assert len(rankings) == model.config.text_config.num_hidden_layers
    for scores, positions in zip(rankings, kept):
        assert scores.shape == (2, length)
        for h in range(2):  # the head's best-ranked token outside what it must keep is kept
            held = positions[h][positions[h] >= 0]
            free = torch.ones(length, dtype=torch.bool)
            free[:4] = False
            free[-8:] = False
            best = int(scores[h].masked_fill(~free, float("-inf")).argmax())
            assert best in held.tolist()


def test_retention_diagnostic_reads_key_diversity_where_a_question_ranks():
    """With a question in the prompt HybridKV ranks by the text prior and never computes
    question-free scores; the diagnostic still records each layer's (Hkv, S) key-diversity scores,
    the bias it reports under ``--protocol answer-after``."""
    from hybridkv import HybridKV
    from hybridkv.models.tiny import tiny_model, visual_inputs

    retention = _benchmark_module("ruler_retention")
    model = tiny_model("qwen2_5_vl", hidden_size=64, heads=4, kv_heads=2, seed=5)
    inputs = visual_inputs(images=2, grid=16, seed=6)  # a question follows the images
    method = HybridKV(0.3, max_dynamic_share=0.0)
    rankings = retention.record_rankings(method)
    with method.apply(model):
        model.generate(**inputs, max_new_tokens=1, do_sample=False)
    assert method.report.extra["token_prior"] == "text_prior"
    assert len(rankings) == model.config.text_config.num_hidden_layers
    assert all(scores.shape == (2, inputs["input_ids"].shape[1]) for scores in rankings)


def test_question_free_prefill_counts_the_compression_and_the_second_ranking():
    """benchmarks/question_free_prefill.py: a prefill under HybridKV without a question runs more
    aten ops than the plain prefill (the compression is inside the profiled forward), ranking
    twice (``derotate_share`` 0.5) more than once (0.0), and the model-wide ranking (the default,
    ``consensus_share`` 0.5) more again."""
    from hybridkv import HybridKV
    from hybridkv.models.tiny import text_inputs, tiny_model

    prefill = _benchmark_module("question_free_prefill")
    model = tiny_model("qwen2")
    prefix = text_inputs(120, seed=3)
    plain = prefill.prefill_ops(model, prefix, None)
    once = prefill.prefill_ops(model, prefix, HybridKV(0.3, derotate_share=0.0, consensus_share=0.0))
    twice = prefill.prefill_ops(model, prefix, HybridKV(0.3, derotate_share=0.5, consensus_share=0.0))
    voted = prefill.prefill_ops(model, prefix, HybridKV(0.3))
    assert plain < once < twice < voted
    seconds, peak = prefill.prefill_seconds(model, prefix, HybridKV(0.3))
    assert seconds > 0 and peak >= 0
