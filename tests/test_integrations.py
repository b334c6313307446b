"""The lm-eval and lmms-eval adapters, offline: local tasks the tests write, answers equal ``hybridkv eval``'s."""

import json
import random
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

from hybridkv.evaluation import evaluate
from hybridkv.integrations.example_tasks import VISUAL_UTILS, VISUAL_YAML, visual_docs, write_task
from hybridkv.integrations.runner import CompressedRunner, cut_at_stop, parse_budget
from hybridkv.models.tiny import tiny_model
from hybridkv.models.tiny_vlm import build_tokenizer
from hybridkv.result_store import ResultStore


@dataclass
class PromptTask:
    """An evaluation task over one text prompt (the ``EvalTask`` shape of ``hybridkv eval``)."""

    key: str
    text: str
    answer: str
    ids: torch.Tensor
    query_tokens: int | None
    kind: str = "local"
    length: int = 0
    depth: float = 0.0
    tail_tokens: int = 0

    def inputs(self) -> dict:
        return {"input_ids": self.ids, "attention_mask": torch.ones_like(self.ids)}

    def is_correct(self, generated: str) -> bool:
        return generated.strip() == self.answer


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny random Llama with a word-level tokenizer, saved as a checkpoint directory."""
    tokenizer = build_tokenizer()
    model = tiny_model("llama", vocab_size=len(tokenizer), layers=2)
    path = tmp_path_factory.mktemp("ckpt")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path, model, tokenizer


def _docs(tokenizer, count: int = 3, words: int = 70) -> list[dict]:
    vocab = [w for w in tokenizer.get_vocab() if w.isalpha() and w.islower()]
    rng = random.Random(0)
    return [{"context": " ".join(rng.choice(vocab) for _ in range(words)) + " what is the colour",
             "answer": rng.choice(vocab), "choices": rng.sample(vocab, 3), "label": 0} for _ in range(count)]


def test_parse_budget_and_stops():
    assert parse_budget("0.1") == 0.1 and parse_budget("512") == 512 and parse_budget(0.2) == 0.2
    with pytest.raises(ValueError, match="fraction"):
        parse_budget("tenth")
    assert cut_at_stop("red blue\ngreen", ["\n", "blue"]) == "red "
    assert cut_at_stop("red", []) == "red"


def test_runner_loglikelihood_full_cache_equals_the_model(checkpoint):
    """FullKV log-likelihood equals log-softmax of one plain forward over context + continuation."""
    _, model, tokenizer = checkpoint
    ids = torch.randint(10, len(tokenizer), (1, 40), generator=torch.Generator().manual_seed(1))
    context, continuation = ids[:, :33], ids[0, 33:]
    logprob, greedy = CompressedRunner(model, tokenizer, "FullKV").loglikelihood({"input_ids": context}, continuation)
    with torch.no_grad():
        logits = model(ids).logits[0, 32:-1].float()
    expected = F.log_softmax(logits, -1).gather(1, continuation[:, None]).sum()
    assert logprob == pytest.approx(float(expected), abs=1e-4)
    assert greedy == bool((logits.argmax(-1) == continuation).all())
    compressed, _ = CompressedRunner(model, tokenizer, "SnapKV", 0.3).loglikelihood({"input_ids": context}, continuation)
    assert compressed != pytest.approx(logprob, abs=1e-6)  # compression reads fewer entries


def test_runner_needs_a_profile_where_the_method_does(checkpoint):
    _, model, tokenizer = checkpoint
    with pytest.raises(ValueError, match="head profile"):
        CompressedRunner(model, tokenizer, "HybridKV-offline", 0.1)


LM_EVAL_GENERATE = """\
task: hkv_local_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{context}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 5
  do_sample: false
metric_list:
  - metric: exact_match
"""

LM_EVAL_CHOICE = """\
task: hkv_local_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
"""


@pytest.mark.parametrize("method", ["SnapKV", "HybridKV"])
def test_lm_eval_answers_equal_hybridkv_eval(checkpoint, tmp_path, method):
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    import hybridkv.integrations.lm_eval  # noqa: F401  (registers the model)

    path, model, tokenizer = checkpoint
    docs = _docs(tokenizer)
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    (tmp_path / "gen.yaml").write_text(LM_EVAL_GENERATE.format(data=data))
    (tmp_path / "choice.yaml").write_text(LM_EVAL_CHOICE.format(data=data))
    out = lm_eval.simple_evaluate(
        model="hybridkv", model_args=f"pretrained={path},method={method},budget=0.5,query_tokens=5",
        tasks=["hkv_local_gen", "hkv_local_choice"], task_manager=TaskManager(include_path=str(tmp_path)),
        device="cpu", log_samples=True, batch_size=1)
    answers = {s["doc_id"]: s["resps"][0][0] for s in out["samples"]["hkv_local_gen"]}

    tasks = [PromptTask(f"d{i}", d["context"], d["answer"], tokenizer(d["context"], return_tensors="pt")["input_ids"], 5)
             for i, d in enumerate(docs)]
    store = ResultStore(tmp_path / "eval.jsonl")
    evaluate(model, tokenizer, "tiny", tasks, store, [method], [0.5], max_new_tokens=5, progress=False)
    expected = {int(r["task"][1:]): cut_at_stop(r["output"], ["\n"]) for r in store.rows.values() if r["method"] == method}
    assert answers == expected and any(answers.values())  # equal, and not vacuously (all empty)

    runner = CompressedRunner(model, tokenizer, method, 0.5, query_tokens=5)
    for sample in out["samples"]["hkv_local_choice"]:
        doc = docs[sample["doc_id"]]
        for (logprob, _), choice in zip([r[0] for r in sample["resps"]], doc["choices"]):
            ids = tokenizer(doc["context"] + " " + choice)["input_ids"]
            context = len(tokenizer(doc["context"])["input_ids"])
            mine, _ = runner.loglikelihood({"input_ids": torch.tensor([ids[:context]])}, torch.tensor(ids[context:]))
            assert logprob == pytest.approx(mine, abs=1e-5)


def test_lm_eval_refuses_rolling_and_sampling(checkpoint):
    pytest.importorskip("lm_eval")
    from hybridkv.integrations.lm_eval import HybridKVLM

    path, _, _ = checkpoint
    lm = HybridKVLM(str(path), method="SnapKV", budget=0.5, device="cpu")
    with pytest.raises(NotImplementedError, match="perplexity"):
        lm.loglikelihood_rolling([])

    class Request:
        args = ("red blue green", {"do_sample": True, "temperature": 0.7})

    with pytest.raises(ValueError, match="greedily"):
        lm.generate_until([Request()])


@pytest.mark.parametrize("protocol", ["answer-after", "question-after"])
def test_lmms_eval_answers_equal_hybridkv_eval(tmp_path, protocol):
    pytest.importorskip("lmms_eval")
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    from hybridkv.data.visual_eval import visual_tasks
    from hybridkv.models.tiny_vlm import load_tiny_vlm

    model, tokenizer, processor = load_tiny_vlm()
    tasks = visual_tasks(tokenizer, processor, ["cell_colour", "needle"], 2, num_images=[4], protocol=protocol)
    write_task(tmp_path / "hkv_visual_local", VISUAL_YAML, VISUAL_UTILS, visual_docs(tasks))
    out = simple_evaluate(model="hybridkv", model_args=f"pretrained=tiny-vlm,method=HybridKV,budget=0.2,protocol={protocol}",
                          tasks=["hkv_visual_local"], task_manager=TaskManager(include_path=str(tmp_path)),
                          batch_size=1, device="cpu", log_samples=True)
    answers = {s["doc_id"]: s["resps"][0][0] if isinstance(s["resps"][0], list) else s["resps"][0]
               for s in out["samples"]["hkv_visual_local"]}

    store = ResultStore(tmp_path / "eval.jsonl")
    evaluate(model, tokenizer, "tiny-vlm", tasks, store, ["HybridKV"], [0.2], max_new_tokens=2, progress=False)
    by_key = {r["task"]: r["output"] for r in store.rows.values() if r["method"] == "HybridKV"}
    assert answers == {i: by_key[t.key] for i, t in enumerate(tasks)} and all(answers.values())
    accuracy = out["results"]["hkv_visual_local"]["accuracy,none"]
    assert accuracy == pytest.approx(sum(t.is_correct(by_key[t.key]) for t in tasks) / len(tasks))
