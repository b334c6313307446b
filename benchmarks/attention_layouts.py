"""One decoding step's attention over one layer whose KV heads keep different numbers of tokens,
in four layouts: the measurement behind :class:`hybridkv.cache.CompressedLayer`'s layout.

* ``rectangle``: every head padded to the longest, one SDPA call with a per-head bias (the
  engine's layout; costs memory when heads differ, no ops);
* ``gather``: entries stored flat, gathered into the rectangle every step, then SDPA;
* ``tiles``: entries stored flat in 64-row tiles owned by heads, each tile multiplied with its
  head's queries, merged by a segment softmax (the previous engine's layout);
* ``block``: entries flat, one SDPA call of all query rows against all entries with a
  block-diagonal mask (every head reads every entry).

Heads keep 0.7x, 1.0x, 1.1x and 1.2x of a 10% budget. Times are medians of many calls;
writes ``results/attention_layouts.{csv,json,png}``.

    python benchmarks/attention_layouts.py [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from hybridkv.bench import print_table, write_results

SHAPES = [(4, 4, 2048), (4, 4, 8192), (28, 4, 8192), (28, 4, 32768)]
"""(query heads, KV heads, context) of the measured layers (head_dim 128)."""


def median_us(fn, calls: int = 100) -> float:
    for _ in range(5):
        fn()
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return round(1e6 * statistics.median(times), 1)


def layouts(hq: int, hkv: int, context: int, dim: int = 128) -> dict:
    """The four attention functions of one layer (closures over random data)."""
    group = hq // hkv
    lengths = torch.tensor([int(0.1 * context * f) for f in (0.7, 1.0, 1.1, 1.2)][:hkv])
    width = int(lengths.max())
    keys, values = torch.randn(1, hkv, width, dim), torch.randn(1, hkv, width, dim)
    bias = torch.where(torch.arange(width)[None, :] < lengths[:, None], 0.0, float("-inf"))[None, :, None, :]
    query = torch.randn(1, hq, 1, dim)
    total = int(lengths.sum())
    flat_k, flat_v = torch.randn(total, dim), torch.randn(total, dim)
    owner = torch.repeat_interleave(torch.arange(hkv), lengths)
    starts = torch.cumsum(lengths, 0) - lengths
    index = (starts[:, None] + torch.arange(width)[None, :]).clamp(max=total - 1).flatten()

    def rectangle():
        return F.scaled_dot_product_attention(query.view(1, hkv, group, dim), keys, values, attn_mask=bias)

    def gather():
        k, v = flat_k.index_select(0, index).view(1, hkv, width, dim), flat_v.index_select(0, index).view(1, hkv, width, dim)
        return F.scaled_dot_product_attention(query.view(1, hkv, group, dim), k, v, attn_mask=bias)

    tiles = (total // 64) * 64
    tile_k, tile_v = flat_k[:tiles].view(-1, 64, dim), flat_v[:tiles].view(-1, 64, dim)
    tile_owner = owner[:tiles:64]
    rows = tile_owner[:, None].expand(-1, group)

    def tiled():
        q = query.view(hkv, group, dim) * dim**-0.5
        logits = torch.bmm(q[tile_owner], tile_k.transpose(1, 2))  # (T, G, 64)
        peak = torch.full((hkv, group), float("-inf")).scatter_reduce_(0, rows, logits.amax(-1), "amax")
        weights = (logits - peak[tile_owner][..., None]).exp_()
        sums = torch.zeros(hkv, group).index_add_(0, tile_owner, weights.sum(-1))
        out = torch.zeros(hkv, group, dim).index_add_(0, tile_owner, torch.bmm(weights, tile_v))
        return out / sums[..., None]

    mine = (torch.arange(hkv).repeat_interleave(group)[:, None] == owner[None, :])[None, None]
    block_mask = torch.zeros(mine.shape).masked_fill(~mine, float("-inf"))

    def block():
        return F.scaled_dot_product_attention(query.view(1, 1, hq, dim), flat_k[None, None], flat_v[None, None],
                                              attn_mask=block_mask)

    return {"rectangle": rectangle, "gather": gather, "tiles": tiled, "block": block,
            "bytes_rectangle": 2 * hkv * width * dim * 4, "bytes_flat": 2 * total * dim * 4}


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    names = ["rectangle", "gather", "tiles", "block"]
    labels = [f"{r['query_heads']}/{r['kv_heads']} heads, {r['context']}" for r in rows]
    width = 0.2
    for i, name in enumerate(names):
        ax.bar([j + i * width for j in range(len(rows))], [r[f"{name}_us"] for r in rows], width, label=name)
    ax.set_xticks([j + 0.3 for j in range(len(rows))], labels, fontsize=7)
    ax.set(ylabel="µs per decoding step of one layer (median)", yscale="log")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="results/attention_layouts")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    with torch.inference_mode():
        for hq, hkv, context in SHAPES:
            fns = layouts(hq, hkv, context)
            row = {"query_heads": hq, "kv_heads": hkv, "context": context}
            row |= {f"{name}_us": median_us(fns[name]) for name in ("rectangle", "gather", "tiles", "block")}
            row |= {"kv_bytes_rectangle": fns["bytes_rectangle"], "kv_bytes_flat": fns["bytes_flat"]}
            rows.append(row)
            print(row, flush=True)
    write_results(rows, args.out, {"benchmark": "attention_layouts", "threads": args.threads})
    plot(rows, f"{args.out}.png")
    print_table(rows, list(rows[0]))


if __name__ == "__main__":
    main()
