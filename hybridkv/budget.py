"""Stage 2 of HybridKV: top-down KV budget allocation, model -> layers -> head types -> heads.

Budgets are counted in *memory slots* (token entries held). Every head first gets its
protected minimum (sinks, prompt text tokens, the prompt's recent window). The free slots are
then split across layers by layer importance (clamped to a share range around uniform), and
inside a layer across heads: a uniform base share plus a share proportional to head
importance, each weighted by the head type's weight. A head never gets more than the prompt
(the excess flows to the others), so a budget of 1.0 keeps everything; all splits are integer
and the total never exceeds the model-wide budget.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Allocation:
    """Integer per-head budgets (layers, kv_heads) in memory slots, and the total they may use."""

    head_budgets: torch.Tensor
    total: int


def tokens_per_head(budget: float | int, prompt_len: int, first: bool = True) -> int:
    """Average kept tokens per KV head for ``budget`` on a segment of ``prompt_len`` tokens.

    An int budget larger than the prompt is refused (``first``: the prompt) or capped at the
    segment (a later turn).
    """
    if isinstance(budget, float):
        return max(1, min(prompt_len, round(budget * prompt_len)))
    if budget > prompt_len and first:
        raise ValueError(
            f"budget={budget} tokens per KV head exceeds the prompt ({prompt_len} tokens): "
            "use a smaller int budget or a fraction such as 0.1."
        )
    return max(1, min(budget, prompt_len))


class BudgetTooSmallError(ValueError):
    """The budget cannot hold the tokens every head must keep (sinks, prompt text, recent window)."""


def waterfill(total: int, weights: torch.Tensor, caps: torch.Tensor) -> torch.Tensor:
    """Split ``total`` integer units proportionally to ``weights`` without exceeding ``caps``.

    Units a capped entry cannot take go to the others (again proportionally); rounding
    remainders go to the largest fractional parts. The result sums to ``min(total, caps.sum())``.

    Args:
        weights: (n,) non-negative floats (all-zero means uniform). caps: (n,) non-negative ints.
    Returns:
        (n,) int64 shares.
    """
    caps = caps.long()
    weights = weights.double().clamp_min(0)
    target = min(int(total), int(caps.sum()))
    alloc = torch.zeros(caps.shape, dtype=torch.float64)
    active = caps > 0
    while active.any():  # proportional split among uncapped entries; cap the overflowing ones
        w = torch.where(active, weights, torch.zeros_like(weights))
        w = w if w.sum() > 0 else active.double()
        proposal = (target - alloc[~active].sum()) * w / w.sum()
        over = active & (proposal > caps)
        if not over.any():
            alloc[active] = proposal[active]
            break
        alloc[over] = caps[over].double()
        active &= ~over
    share = alloc.floor().long().minimum(caps)
    short = target - int(share.sum())
    for index in (alloc - share).argsort(descending=True).tolist():  # largest remainders first
        if short <= 0:
            break
        if share[index] < caps[index]:
            share[index] += 1
            short -= 1
    return share


def allocate(
    total: int,
    prompt_len: int,
    protected: int,
    layer_importance: torch.Tensor,
    head_importance: torch.Tensor,
    type_weight: torch.Tensor,
    layer_share_range: tuple[float, float] = (0.5, 2.0),
    base_share: float = 0.5,
) -> Allocation:
    """Top-down integer budgets.

    Args:
        total: model-wide memory slots ``budget x prompt_len x layers x kv_heads``.
        prompt_len: L; no head gets more than L.
        protected: slots every head must keep (sinks + text tokens + recent window).
        layer_importance: (layers,) non-negative.
        head_importance: (layers, kv_heads) non-negative.
        type_weight: (layers, kv_heads) weight of each head's type (e.g. 1 static, w dynamic).
        layer_share_range: (min, max) multiple of the uniform layer share allowed.
        base_share: part of a layer's free slots split uniformly (by type weight) across heads.
    Returns:
        :class:`Allocation` with ``head_budgets`` (layers, kv_heads), ``protected <= b <= L``.
    Raises:
        BudgetTooSmallError: when ``total`` cannot cover every head's protected slots.
    """
    layers, heads = head_importance.shape
    protected = min(protected, prompt_len)
    if total < protected * layers * heads:
        raise BudgetTooSmallError(
            f"the budget ({total / (layers * heads):.1f} tokens per head) is below the {protected} tokens every head "
            "must keep (sinks + prompt text + recent window): raise the budget or shorten the prompt's text."
        )
    free = total - protected * layers * heads
    room = prompt_len - protected
    lo, hi = layer_share_range
    share = layer_importance.double().clamp_min(0)
    share = share / share.sum() if share.sum() > 0 else torch.full((layers,), 1.0 / layers, dtype=torch.float64)
    share = share.clamp(lo / layers, hi / layers)
    layer_free = waterfill(free, share, torch.full((layers,), room * heads))
    budgets = torch.empty(layers, heads, dtype=torch.long)
    for layer in range(layers):
        typed = type_weight[layer].double()
        importance = head_importance[layer].double().clamp_min(0) * typed
        importance = importance / importance.sum() if importance.sum() > 0 else typed / typed.sum()
        weights = base_share * typed / typed.sum() + (1 - base_share) * importance
        budgets[layer] = protected + waterfill(int(layer_free[layer]), weights, torch.full((heads,), room))
    return Allocation(budgets, total)
