"""Which of a RULER prompt's reference strings HybridKV keeps, per KV head: the diagnostic behind
``docs/ruler.md`` (question-agnostic tuning).

Compresses one RULER prompt (Qwen2.5-Coder-1.5B, bfloat16) with HybridKV and, for each reference
string (a needle's value, a word), counts the static KV heads whose kept tokens hold all of its
tokens, the mean share of its tokens they hold, and the share of the 12 tokens before it (the
needle's key sentence); dynamic heads are counted apart. Writes
``results/ruler_retention_<task>_s<seed>.{csv,json,png}``.

    python benchmarks/ruler_retention.py --task niah_multivalue --seed 101 [--protocol question-after]
        [--budget 0.1] [--length 4096] [--anchor 512] [--share 0.0] [--consensus 0.0] [--threads 1]

It also reports the position bias of the key-diversity ranking: over every KV head, the mean
percentile rank of the tokens in each eighth of the prompt by the scores HybridKV ranked them by
while compressing (:meth:`~hybridkv.HybridKV.key_diversity_scores`; pooled over
``diversity_kernel``, the union with the keys' RoPE undone at ``derotate_share``, and that
with the model-wide ranking at ``consensus_share``), in
``meta["diversity_percentile_by_eighth"]``; 0.5 everywhere is no bias. Under ``--protocol
answer-after`` the prompt holds its question and HybridKV ranks by the text prior instead; the
bias is then that of the ranking key diversity would have given.

``--anchor`` sets HybridKV's ``diversity_anchor`` (question-agnostic key diversity against the
mean of that many neighbouring keys) and adds ``_a<anchor>`` to the file names; ``--share`` sets
its ``derotate_share`` and adds ``_d<share>`` where it is not the default; ``--consensus`` sets its
``consensus_share`` and adds ``_c<consensus>`` where it is not the default.
"""

from __future__ import annotations

import argparse

import torch

from hybridkv import HybridKV
from hybridkv.bench import print_table, write_results
from hybridkv.data.ruler import RULER_TASKS, ruler_tasks
from hybridkv.harness import split_tail
from hybridkv.models.loading import load_model

BEFORE = 12
"""Tokens before a reference counted as its key sentence."""


def token_span(ids: list[int], piece: list[int]) -> list[int]:
    """Positions of the first occurrence of the token sequence ``piece`` in ``ids`` ([] if absent)."""
    for start in range(len(ids) - len(piece) + 1):
        if ids[start : start + len(piece)] == piece:
            return list(range(start, start + len(piece)))
    return []


def retention(kept: list[list[set[int]]], types: list[list[str]], span: list[int]) -> dict:
    """Over static heads (``kept``: per layer, per KV head, kept positions): how many keep all of
    ``span``, the mean share of it they keep, and the mean share of the ``BEFORE`` tokens before it."""
    static = [(layer, head) for layer, row in enumerate(types) for head, kind in enumerate(row) if kind == "static"]
    before = list(range(max(0, span[0] - BEFORE), span[0]))
    share = [sum(p in kept[layer][head] for p in span) / len(span) for layer, head in static]
    key = [sum(p in kept[layer][head] for p in before) / max(1, len(before)) for layer, head in static]
    return {"static_heads": len(static), "heads_keeping_all": sum(s == 1.0 for s in share),
            "mean_share": round(sum(share) / max(1, len(share)), 3),
            "key_share": round(sum(key) / max(1, len(key)), 3)}


def record_rankings(method: HybridKV) -> list[torch.Tensor]:
    """Make ``method`` record, for every layer it compresses, the (Hkv, S) scores its
    question-free ranking ranks that layer's tokens by (where the prompt holds a question, the
    scores key diversity would have ranked them by); returns the list it appends to."""
    rankings: list[torch.Tensor] = []
    scores, compress = method.question_free_scores, method.compress

    def recording_scores(ctx, plan):
        out = scores(ctx, plan)
        rankings.append(out[1].float().cpu())
        return out

    def recording_compress(ctx, plan):
        if plan.settings["token_prior"] != "key_diversity":  # a question ranks: no question-free scores
            rankings.append(method.key_diversity_scores(ctx)[1].float().cpu())
        return compress(ctx, plan)

    method.question_free_scores, method.compress = recording_scores, recording_compress
    return rankings


def position_bias(rankings: list[torch.Tensor]) -> list[float]:
    """Mean percentile rank per eighth of the prompt of every layer's (Hkv, S) ranking scores,
    over the layers and KV heads (0.5 everywhere: no position bias)."""
    length = rankings[0].shape[-1]
    edges = torch.linspace(0, length, 9).long()
    totals = torch.zeros(8)
    for scores in rankings:
        rank = scores.argsort(dim=-1).argsort(dim=-1).float() / length  # (Hkv, S) percentile
        totals += torch.stack([rank[:, edges[i] : edges[i + 1]].mean() for i in range(8)])
    return [round(float(x), 3) for x in totals / len(rankings)]


def plot(rows: list[dict], out: str, title: str) -> None:
    """Bar chart of each reference's kept share and its key sentence's, to ``<out>.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3))
    x = range(len(rows))
    ax.bar([i - 0.2 for i in x], [r["mean_share"] for r in rows], 0.4, label="reference tokens kept")
    ax.bar([i + 0.2 for i in x], [r["key_share"] for r in rows], 0.4, label=f"{BEFORE} tokens before")
    ax.set_xticks(list(x), [r["reference"] for r in rows], rotation=20)
    ax.set_ylabel("mean share over static heads")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(f"{out}.png", dpi=120)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", required=True, choices=list(RULER_TASKS))
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--protocol", default="question-after", choices=["answer-after", "question-after"])
    parser.add_argument("--budget", type=float, default=0.1)
    parser.add_argument("--anchor", type=int, default=None, help="HybridKV's diversity_anchor (default: none)")
    parser.add_argument("--share", type=float, default=HybridKV.derotate_share,
                        help=f"HybridKV's derotate_share (default: {HybridKV.derotate_share})")
    parser.add_argument("--consensus", type=float, default=HybridKV.consensus_share,
                        help=f"HybridKV's consensus_share (default: {HybridKV.consensus_share})")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model("qwen2.5-coder-1.5b", torch.bfloat16)
    task = ruler_tasks(tokenizer, [args.task], [args.length], [args.seed], protocol=args.protocol)[0]
    prefix, _ = split_tail(model, task.inputs(), task.tail_tokens)
    ids = prefix["input_ids"][0].tolist()
    method = HybridKV(args.budget, diversity_anchor=args.anchor, derotate_share=args.share,
                      consensus_share=args.consensus)
    rankings = record_rankings(method)
    with torch.inference_mode(), method.apply(model, query_tokens=task.query_tokens) as engine:
        model.generate(**prefix, max_new_tokens=1, do_sample=False)
        kept = [[{p for p in layer.kept_positions[0, h].tolist() if p >= 0} for h in range(layer.kv_heads)]
                for layer in engine.layers]
    types = method.report.head_types
    dynamic = sum(kind == "dynamic" for row in types for kind in row)
    rows = []
    for ref in task.references:
        span = token_span(ids, tokenizer(ref, add_special_tokens=False)["input_ids"])
        if not span:
            raise SystemExit(f"reference {ref!r} is not a token run of the prompt; this diagnostic needs one.")
        rows.append({"reference": ref, "position": span[0], "tokens": len(span), "dynamic_heads": dynamic,
                     **retention(kept, types, span)})
    bias = position_bias(rankings)
    suffix = (f"_a{args.anchor}" if args.anchor else "") + (
        f"_d{args.share}" if args.share != HybridKV.derotate_share else "") + (
        f"_c{args.consensus}" if args.consensus != HybridKV.consensus_share else "")
    out = f"results/ruler_retention_{args.task}_s{args.seed}{suffix}"
    write_results(rows, out, {"benchmark": "ruler_retention", "task": task.key, "budget": args.budget,
                                 "diversity_anchor": args.anchor, "derotate_share": args.share,
                                 "consensus_share": args.consensus,
                                 "diversity_percentile_by_eighth": bias})
    print_table(rows, list(rows[0]))
    print("key-diversity percentile by eighth of the prompt:", bias)
    plot(rows, out, f"HybridKV@{args.budget}: {task.key}" + (f", anchor {args.anchor}" if args.anchor else "")
         + f", derotate_share {args.share}, consensus_share {args.consensus}")
