"""Quality evaluation: methods x budgets on long-text retrieval and visual question tasks, with kvpress side by side.

For every prompt the full prefill runs once (:func:`hybridkv.harness.capture_prefill`); each
hybridkv method then builds its compressed cache from the capture and decodes greedily
(accuracy, exact-prefix agreement with the full cache's answer) and teacher-forced along the
full cache's answer (mean KL of the next-token distributions). A task whose ``tail_tokens`` is
non-zero has its last tokens fed after compression (:func:`hybridkv.harness.capture_prefill`),
so that even a one-word answer is read from the compressed cache. kvpress presses (a benchmark
extra) run their own prefill through ``model.generate`` on the same prompts, model and
transformers. Every result is appended to a JSONL file as soon as it exists, keyed by
(model, task, method, budget): a rerun skips what is there (resumable).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from hybridkv.budget import BudgetTooSmallError
from hybridkv.harness import capture_prefill, decode, mean_kl, prefix_agreement
from hybridkv.methods import H2O, AdaKV, FullKV, HybridKV, PyramidKV, Quest, SnapKV, SparseMM, StreamingLLM
from hybridkv.methods.base import Method
from hybridkv.profile import HeadProfile


class EvalTask(Protocol):
    """What :func:`evaluate` needs of a task (``TextTask`` and ``VisualTask`` have it)."""

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
METHODS = ("StreamingLLM", "H2O", "SnapKV", "PyramidKV", "AdaKV", "SparseMM", "Quest", "HybridKV", "HybridKV-offline")
PEERS = ("kvpress:StreamingLLM", "kvpress:ObservedAttention", "kvpress:SnapKV", "kvpress:PyramidKV", "kvpress:AdaKV")
_NEED_PROFILE = ("SparseMM", "HybridKV-offline")


def _parse_options(text: str) -> dict:
    """``"pool=4,store=host"`` -> ``{"pool": 4.0, "store": "host"}`` (numbers and None parsed)."""
    options = {}
    for item in filter(None, text.split(",")):
        key, _, value = item.partition("=")
        if value == "None":
            options[key] = None
        else:
            try:
                options[key] = int(value) if value.isdigit() else float(value)
            except ValueError:
                options[key] = value
    return options


def make_method(name: str, budget: float, profile: HeadProfile | None = None) -> Method:
    """A hybridkv method by table name (``HybridKV-offline`` and ``SparseMM`` need ``profile``).

    ``Name:key=value,...`` passes constructor options, e.g. ``HybridKV:pool=4`` or
    ``HybridKV-offline:pool=None``.
    """
    name, _, options = name.partition(":")
    kwargs = _parse_options(options)
    if name in _NEED_PROFILE and profile is None:
        raise ValueError(f"{name} needs a head profile of the model (hybridkv profile --model ...).")
    factories: dict[str, Callable[[], Method]] = {
        "FullKV": lambda: FullKV(**kwargs),
        "StreamingLLM": lambda: StreamingLLM(budget, **kwargs),
        "H2O": lambda: H2O(budget, **kwargs),
        "SnapKV": lambda: SnapKV(budget, **kwargs),
        "PyramidKV": lambda: PyramidKV(budget, **kwargs),
        "AdaKV": lambda: AdaKV(budget, **kwargs),
        "SparseMM": lambda: SparseMM(budget, profile, **kwargs),
        "Quest": lambda: Quest(budget, **kwargs),
        "HybridKV": lambda: HybridKV(budget, **kwargs),
        "HybridKV-offline": lambda: HybridKV(budget, profile=profile, **kwargs),
    }
    if name not in factories:
        raise ValueError(f"unknown method {name!r}; known: {', '.join(factories)}.")
    return factories[name]()


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


@dataclass
class ResultStore:
    """Append-only JSONL of result rows, indexed by (model, task, method, budget)."""

    path: Path

    def __post_init__(self) -> None:
        self.path = Path(self.path)
        self.rows: dict[tuple, dict] = {}
        if self.path.exists():
            for number, line in enumerate(self.path.read_text().splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as error:
                    raise ValueError(f"{self.path}:{number} is not a JSON line ({error}); fix or remove it.") from error
                self.rows[self.key(row)] = row

    @staticmethod
    def key(row: dict) -> tuple:
        return row["model"], row["task"], row["method"], row["budget"]

    def __contains__(self, key: tuple) -> bool:
        return key in self.rows

    def add(self, row: dict) -> None:
        self.rows[self.key(row)] = row
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")


def _row(model_name: str, task: EvalTask, method: str, budget: float, text: str, agreement: float,
         kl: float | None, report=None) -> dict:
    return {
        "model": model_name, "task": task.key, "kind": task.kind, "length": task.length, "depth": task.depth,
        "method": method, "budget": budget, "answer": task.answer, "output": text,
        "correct": task.is_correct(text), "prefix_agreement": round(agreement, 4),
        "kl": None if kl is None else round(kl, 5),
        "kv_ratio": None if report is None else round(report.compression_ratio, 2),
        "prompt_tokens": int(task.inputs()["input_ids"].shape[1]), "tail_tokens": task.tail_tokens,
    }


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
    if peers and any(task.tail_tokens for task in tasks):
        raise ValueError("kvpress peers run their own prefill of the whole prompt; they cannot feed a tail after "
                         "compression. Evaluate tasks with a tail (visual protocols) without --peers.")
    stop = tuple(i for i in [tokenizer.eos_token_id] if i is not None)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(tasks) * (1 + (len(methods) + len(peers)) * len(budgets)), desc=f"eval {model_name}")
    for task in tasks:
        todo = [(m, b) for m in methods for b in budgets if (model_name, task.key, m, b) not in store]
        todo_peers = [(p, b) for p in peers for b in budgets if (model_name, task.key, p, b) not in store]
        if bar is not None:
            bar.update(1 + (len(methods) + len(peers)) * len(budgets) - len(todo) - len(todo_peers))
        if not todo and not todo_peers and (model_name, task.key, "FullKV", 1.0) in store:
            continue
        capture = capture_prefill(model, task.inputs(), query_tokens=task.query_tokens, tail_tokens=task.tail_tokens)
        full = decode(model, FullKV(), capture, max_new_tokens, stop_ids=stop)
        full_text = tokenizer.decode(full.tokens, skip_special_tokens=True)
        if (model_name, task.key, "FullKV", 1.0) not in store:
            store.add(_row(model_name, task, "FullKV", 1.0, full_text, 1.0, 0.0, full.report))
        for name, budget in todo:
            method = make_method(name, budget, profile)
            try:
                greedy = decode(model, method, capture, max_new_tokens, stop_ids=stop)
            except BudgetTooSmallError:  # recorded, so the table says n/a instead of a number
                store.add({**_row(model_name, task, name, budget, "", 0.0, None), "correct": None, "infeasible": True})
                if bar is not None:
                    bar.update(1)
                continue
            forced = decode(model, make_method(name, budget, profile), capture, max_new_tokens, forced=full.tokens)
            text = tokenizer.decode(greedy.tokens, skip_special_tokens=True)
            store.add(_row(model_name, task, name, budget, text, prefix_agreement(greedy.tokens, full.tokens),
                           mean_kl(full.logits, forced.logits), greedy.report))
            if bar is not None:
                bar.update(1)
        del capture
        for name, budget in todo_peers:
            tokens = _kvpress_generate(model, task, name, budget, max_new_tokens)
            text = tokenizer.decode(tokens, skip_special_tokens=True)
            store.add(_row(model_name, task, name, budget, text, prefix_agreement(tokens, full.tokens), None))
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()


def _kvpress_generate(model, task: EvalTask, name: str, budget: float, max_new_tokens: int) -> torch.Tensor:
    """Greedy answer under a kvpress press (its own prefill), (T,) ids."""
    press = kvpress_press(name, budget)
    inputs = task.inputs()
    eager = name.endswith("ObservedAttention")  # it reads attention weights: eager attention
    config = model.config.get_text_config(decoder=True)
    saved = config._attn_implementation_internal
    if eager:
        config._attn_implementation_internal = "eager"
    try:
        with torch.inference_mode(), press(model):
            out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    finally:
        config._attn_implementation_internal = saved
    return out[0, inputs["input_ids"].shape[1] :]


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


def summarize(rows: Iterable[dict], model_name: str) -> list[dict]:
    """Per (method, budget) of one model: prompts, accuracy %, mean prefix agreement, mean KL, mean
    KV compression ratio (full cache bytes / bytes held).

    Prompts whose budget was below the method's protected minimum (``infeasible`` rows) are
    counted apart; a cell with no feasible prompt has None metrics (``n/a`` in the tables).
    """
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        if row["model"] == model_name:
            groups.setdefault((row["method"], row["budget"]), []).append(row)
    table = []
    for (method, budget), rows_ in sorted(groups.items(), key=lambda kv: (kv[0][0] != "FullKV", kv[0][0], kv[0][1])):
        items = [r for r in rows_ if not r.get("infeasible")]
        kls = [r["kl"] for r in items if r["kl"] is not None]
        ratios = [r["kv_ratio"] for r in items if r.get("kv_ratio") is not None]
        n = len(items)
        table.append({
            "method": method, "budget": budget, "prompts": n, "infeasible": len(rows_) - n,
            "accuracy": round(100 * sum(r["correct"] for r in items) / n, 1) if n else None,
            "prefix_agreement": round(sum(r["prefix_agreement"] for r in items) / n, 3) if n else None,
            "kl": round(sum(kls) / len(kls), 4) if kls else None,
            "kv_ratio": round(sum(ratios) / len(ratios), 2) if ratios else None,
        })
    return table


def markdown_table(table: list[dict], metric: str = "accuracy") -> str:
    """Methods as rows, budgets as columns, ``metric`` in the cells (FullKV: one column)."""
    budgets = sorted({r["budget"] for r in table if r["method"] != "FullKV"})
    methods = list(dict.fromkeys(r["method"] for r in table))
    cell = {(r["method"], r["budget"]): r for r in table}
    full = cell.get(("FullKV", 1.0))
    lines = [f"| method | {' | '.join(str(b) for b in budgets)} | prompts |", "|---" * (len(budgets) + 2) + "|"]
    if full:
        lines.append(f"| FullKV | {' | '.join(str(full[metric]) for _ in budgets)} | {full['prompts']} |")
    for method in methods:
        if method == "FullKV":
            continue
        values = [_cell_text(cell.get((method, b)), metric) for b in budgets]
        prompts = max(cell[(method, b)]["prompts"] for b in budgets if (method, b) in cell)
        lines.append(f"| {method} | {' | '.join(values)} | {prompts} |")
    return "\n".join(lines)


def _cell_text(row: dict | None, metric: str) -> str:
    """A markdown cell: the metric, ``n/a`` when the budget was infeasible for every prompt."""
    if row is None:
        return ""
    if row[metric] is None:
        return "n/a" if row.get("infeasible") else ""
    return str(row[metric]) + (f" ({row['infeasible']} n/a)" if row.get("infeasible") else "")


def plot(table: list[dict], path: str | Path, metric: str = "accuracy", title: str = "") -> None:
    """``metric`` against budget, one line per method; FullKV dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method in dict.fromkeys(r["method"] for r in table):
        rows = sorted((r for r in table if r["method"] == method and r[metric] is not None), key=lambda r: r["budget"])
        if not rows:
            continue
        if method == "FullKV":
            ax.axhline(rows[0][metric], color="k", ls="--", label="FullKV")
            continue
        style = "o-" if not method.startswith("kvpress") else "s:"
        width = 2.5 if method.startswith("HybridKV") else 1.2
        ax.plot([r["budget"] for r in rows], [r[metric] for r in rows], style, lw=width, label=method)
    ax.set(xlabel="budget (fraction of prompt KV)", ylabel=metric, title=title, xscale="log")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
