"""Quality evaluation: methods x budgets on long-text retrieval and visual question tasks, with kvpress side by side.

For every prompt the full prefill runs once (:func:`hybridkv.harness.capture_prefill`); each
hybridkv method then builds its compressed cache from the capture and decodes greedily
(accuracy, exact-prefix agreement with the full cache's answer) and teacher-forced along the
full cache's answer (mean KL of the next-token distributions). A task whose ``tail_tokens`` is
non-zero has its last tokens fed after compression (:func:`hybridkv.harness.capture_prefill`),
so that even a one-word answer is read from the compressed cache. kvpress presses (a benchmark
extra) run their own prefill on the same prompts, model and transformers: through
``model.generate``, or, for a text task with a tail, as kvpress's pipeline does (prefix under the
press, then the tail and the answer at positions continuing from the prefix). When a method's
teacher-forced steps all pick the full cache's tokens, its greedy answer is that answer and is
not decoded twice. Every result is appended to a JSONL file as soon as it exists, keyed by
(model, task, method, budget): a rerun skips what is there (resumable).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Protocol

import torch
from transformers import DynamicCache

from hybridkv.harness import capture_prefill, decode, mean_kl, prefix_agreement
from hybridkv.head_profile import HeadProfile
from hybridkv.methods import REGISTRY, FullKV, make_method
from hybridkv.models.architectures import model_spec
from hybridkv.result_store import ResultStore
from hybridkv.tables import markdown_table, plot, summarize


class EvalTask(Protocol):
    """What :func:`evaluate` needs of a task (``TextTask``, ``VisualTask`` and the RULER tasks have it).

    A task may also have ``score(generated) -> float`` (a share of reference strings found;
    then the tables average it) and ``max_new_tokens`` (its answer length, overriding the run's).
    """

    key: str
    kind: str
    length: int
    depth: float
    answer: str
    query_tokens: int | None
    tail_tokens: int

    def inputs(self) -> dict[str, torch.Tensor]: ...

    def is_correct(self, generated: str) -> bool: ...


BUDGETS = (0.05, 0.1, 0.2, 0.4)
METHODS = (*sorted(name for name in REGISTRY if name != "FullKV"), "HybridKV-offline")
"""Every registered method (FullKV is the reference row of every table) and HybridKV with a profile."""
PEERS = ("kvpress:StreamingLLM", "kvpress:ObservedAttention", "kvpress:SnapKV", "kvpress:PyramidKV", "kvpress:AdaKV")


def kvpress_press(name: str, budget: float):
    """The kvpress press of a ``kvpress:<Name>`` table name at compression ratio ``1 - budget``."""
    try:
        import kvpress
    except ImportError as error:
        raise ImportError("kvpress is a benchmark extra: pip install 'hybridkv[bench]' (kvpress==0.5.5).") from error
    ratio = 1.0 - budget
    short = name.split(":", 1)[1]
    if short == "AdaKV":
        return kvpress.AdaKVPress(kvpress.SnapKVPress(compression_ratio=ratio))
    return getattr(kvpress, f"{short}Press")(compression_ratio=ratio)


def _row(model_name: str, task: EvalTask, method: str, budget: float, text: str, agreement: float,
         kl: float | None, report=None) -> dict:
    row = {
        "model": model_name, "task": task.key, "kind": task.kind, "length": task.length, "depth": task.depth,
        "method": method, "budget": budget, "answer": task.answer, "output": text,
        "correct": task.is_correct(text), "prefix_agreement": round(agreement, 4),
        "kl": None if kl is None else round(kl, 5),
        "kv_ratio": None if report is None else round(report.compression_ratio, 2),
        "budget_exceeded_tokens": None if report is None else report.budget_exceeded_tokens,
        "prompt_tokens": _prompt_tokens(task), "tail_tokens": task.tail_tokens,
    }
    if hasattr(task, "score"):
        row["score"] = round(float(task.score(text)), 4)
    return row


def evaluate(
    model: torch.nn.Module,
    tokenizer,
    model_name: str,
    tasks: Iterable[EvalTask],
    store: ResultStore,
    methods: Iterable[str] = METHODS,
    budgets: Iterable[float] = BUDGETS,
    peers: Iterable[str] = (),
    profile: HeadProfile | None = None,
    max_new_tokens: int = 8,
    progress: bool = True,
) -> None:
    """Run every (task, method, budget) not yet in ``store`` and append its row."""
    methods, budgets, peers, tasks = list(methods), list(budgets), list(peers), list(tasks)
    if peers and model_spec(model).has_mrope and any(task.tail_tokens and "pixel_values" in task.inputs() for task in tasks):
        raise ValueError("kvpress peers feed a tail after compression with 1-D positions only (text models and "
                         "VLMs with 1-D positions, e.g. LLaVA-OneVision); evaluate this M-RoPE model's visual tasks "
                         "with a tail without --peers.")
    stop = tuple(i for i in [tokenizer.eos_token_id] if i is not None)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(tasks) * (1 + (len(methods) + len(peers)) * len(budgets)), desc=f"eval {model_name}")
    for task in tasks:
        _check_stored_prompt(store, model_name, task)
        todo = [(m, b) for m in methods for b in budgets if (model_name, task.key, m, b) not in store]
        todo_peers = [(p, b) for p in peers for b in budgets if (model_name, task.key, p, b) not in store]
        if bar is not None:
            bar.update(1 + (len(methods) + len(peers)) * len(budgets) - len(todo) - len(todo_peers))
        if not todo and not todo_peers and (model_name, task.key, "FullKV", 1.0) in store:
            continue
        capture = capture_prefill(model, task.inputs(), query_tokens=task.query_tokens, tail_tokens=task.tail_tokens)
        new_tokens = getattr(task, "max_new_tokens", max_new_tokens)
        full = decode(model, FullKV(), capture, new_tokens, stop_ids=stop)
        full_text = tokenizer.decode(full.tokens, skip_special_tokens=True)
        if (model_name, task.key, "FullKV", 1.0) not in store:
            store.add(_row(model_name, task, "FullKV", 1.0, full_text, 1.0, 0.0, full.report))
        for name, budget in todo:
            method = make_method(name, budget, profile)
            forced = decode(model, method, capture, new_tokens, forced=full.tokens)
            # Teacher forcing feeds the full cache's answer; when every step's argmax is that answer, greedy
            # decoding would feed the same tokens and compute the same logits, so it is not run again.
            same = bool((forced.logits.argmax(-1) == full.tokens).all())
            greedy = forced if same else decode(model, method, capture, new_tokens, stop_ids=stop)
            text = tokenizer.decode(greedy.tokens, skip_special_tokens=True)
            store.add(_row(model_name, task, name, budget, text, prefix_agreement(greedy.tokens, full.tokens),
                           mean_kl(full.logits, forced.logits), greedy.report))
            if bar is not None:
                bar.update(1)
        del capture
        for name, budget in todo_peers:
            tokens = _kvpress_generate(model, task, name, budget, new_tokens, stop)
            text = tokenizer.decode(tokens, skip_special_tokens=True)
            store.add(_row(model_name, task, name, budget, text, prefix_agreement(tokens, full.tokens), None))
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()


def _prompt_tokens(task: EvalTask) -> int:
    """Tokens in the task's prompt (the ``prompt_tokens`` of its rows)."""
    return int(task.inputs()["input_ids"].shape[1])


def _check_stored_prompt(store: ResultStore, model_name: str, task: EvalTask) -> None:
    """Refuse to resume a task whose stored full-cache row was written for a prompt of another length:
    the task key names the task and seed, not the prompt's wording, so a changed template would
    otherwise mix two prompts in one table."""
    stored = store.rows.get((model_name, task.key, "FullKV", 1.0))
    if stored is None or "prompt_tokens" not in stored:
        return
    length = _prompt_tokens(task)
    if stored["prompt_tokens"] != length:
        raise ValueError(f"{store.path} holds {task.key} for a prompt of {stored['prompt_tokens']} tokens; this run's "
                         f"prompt has {length}: the prompt changed since those rows were written. Write to a new "
                         "--out, or remove the file to rerun.")


def _kvpress_generate(model, task: EvalTask, name: str, budget: float, max_new_tokens: int,
                      stop_ids: tuple[int, ...]) -> torch.Tensor:
    """Greedy answer under a kvpress press (its own prefill), (T,) ids.

    Without a tail the press compresses the whole prompt inside ``model.generate``. With one
    (question-agnostic) the press compresses the prefix alone and the tail and the answer are then
    fed with explicit positions continuing from the prefix's length, as kvpress's own pipeline
    does: its truncated ``DynamicCache`` reports the tokens it stores, not the tokens it has seen.
    """
    press = kvpress_press(name, budget)
    inputs = task.inputs()
    eager = name.endswith("ObservedAttention")  # it reads attention weights: eager attention
    config = model.config.get_text_config(decoder=True)
    saved = config._attn_implementation_internal
    if eager:
        config._attn_implementation_internal = "eager"
    try:
        with torch.inference_mode():
            if not task.tail_tokens:
                with press(model):
                    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
                return out[0, inputs["input_ids"].shape[1] :]
            return _kvpress_after_tail(model, press, inputs, task.tail_tokens, max_new_tokens, stop_ids)
    finally:
        config._attn_implementation_internal = saved


def _kvpress_after_tail(model, press, inputs: dict[str, torch.Tensor], tail_tokens: int, max_new_tokens: int,
                        stop_ids: tuple[int, ...]) -> torch.Tensor:
    """Prefill the prompt ``inputs["input_ids"]`` (1, L) but its last ``tail_tokens`` under ``press``
    (with the prompt's other inputs, e.g. a 1-D-position VLM's pixels), then feed the tail and decode
    greedily at positions L - tail_tokens, L - tail_tokens + 1, ... outside the press; (T,) ids."""
    cache = DynamicCache()
    input_ids = inputs["input_ids"]
    prefix_len = input_ids.shape[1] - tail_tokens
    prefix = {**inputs, "input_ids": input_ids[:, :prefix_len]}
    if "attention_mask" in inputs:
        prefix["attention_mask"] = inputs["attention_mask"][:, :prefix_len]
    with press(model):
        model.model(**prefix, past_key_values=cache, use_cache=True)
    feed, position, tokens = input_ids[:, prefix_len:], prefix_len, []
    for _ in range(max_new_tokens):
        positions = torch.arange(position, position + feed.shape[1], device=input_ids.device)[None]
        logits = model(input_ids=feed, past_key_values=cache, position_ids=positions, use_cache=True).logits
        tokens.append(int(logits[0, -1].argmax()))
        if tokens[-1] in stop_ids:
            break
        position += feed.shape[1]
        feed = torch.tensor([[tokens[-1]]], device=input_ids.device)
    return torch.tensor(tokens)


def run_table(model: torch.nn.Module, tokenizer, model_name: str, tasks: list[EvalTask], out: str | Path,
              methods: Iterable[str] = METHODS, budgets: Iterable[float] = BUDGETS, peers: Iterable[str] = (),
              profile: HeadProfile | None = None, max_new_tokens: int = 8, title: str = "accuracy",
              kinds: Iterable[str] | None = None) -> list[dict]:
    """Evaluate (resuming ``out``.jsonl), then write the summary as CSV/JSON, markdown and PNG.

    ``kinds`` adds one summary per task kind (e.g. single-image vs multi-image) beside the overall
    one; a kind ending in ``*`` groups every kind with that prefix (``needle-*``) and also gets
    its own KL table.
    """
    from hybridkv.bench import with_ext, write_results

    store = ResultStore(with_ext(out, ".jsonl"))
    evaluate(model, tokenizer, model_name, tasks, store, methods, budgets, peers, profile, max_new_tokens)
    rows = [r for r in store.rows.values() if r["task"] in {t.key for t in tasks}]
    table = summarize(rows, model_name)
    write_results(table, out, {"benchmark": "quality", "model": model_name, "prompts": len(tasks)})
    plot(table, with_ext(out, ".png"), title=f"{model_name}: {title} ({len(tasks)} prompts)")
    sections = [f"## {model_name}: {title}, all {len(tasks)} prompts\n\n{markdown_table(table)}"]
    for kind in kinds or []:
        match = (lambda k, kind=kind: k.startswith(kind[:-1])) if kind.endswith("*") else (lambda k, kind=kind: k == kind)
        part = summarize([r for r in rows if match(r["kind"])], model_name)
        if part:
            sections.append(f"## {kind}\n\n{markdown_table(part)}")
        if part and kind.endswith("*"):
            sections.append(f"## {kind}: mean KL to the full cache (teacher-forced)\n\n{markdown_table(part, 'kl')}")
    sections.append(f"## mean KL to the full cache (teacher-forced), all prompts\n\n{markdown_table(table, 'kl')}")
    markdown = "\n\n".join(sections)
    with_ext(out, ".md").write_text(markdown + "\n")
    print(markdown)
    return table


