"""Stage 2 guarantees: integer budgets, sum never above the total, protected minimum, caps."""

import pytest
import torch

from hybridkv.budget import allocate, waterfill


@pytest.mark.parametrize("total", [0, 1, 7, 13, 1000, 10**6])
def test_waterfill_sums_to_target_within_caps(total):
    caps = torch.tensor([5, 0, 100, 3, 40])
    weights = torch.tensor([1.0, 5.0, 0.5, 10.0, 2.0])
    share = waterfill(total, weights, caps)
    assert share.dtype == torch.long
    assert int(share.sum()) == min(total, int(caps.sum()))
    assert bool((share >= 0).all()) and bool((share <= caps).all())


def test_waterfill_is_proportional_when_nothing_caps():
    share = waterfill(100, torch.tensor([1.0, 3.0]), torch.tensor([1000, 1000]))
    assert share.tolist() == [25, 75]


@pytest.mark.parametrize("fraction", [0.05, 0.1, 0.2, 0.5, 1.0])
def test_allocate_guarantees(fraction):
    torch.manual_seed(0)
    layers, heads, length, protected = 6, 4, 900, 30
    total = int(fraction * length * layers * heads)
    alloc = allocate(total, length, protected, torch.rand(layers) * 5, torch.rand(layers, heads),
                     torch.where(torch.rand(layers, heads) > 0.5, 1.0, 2.0))
    b = alloc.head_budgets
    assert b.shape == (layers, heads) and b.dtype == torch.long
    assert int(b.sum()) <= total
    assert int(b.sum()) >= total - layers * heads  # nothing is wasted beyond rounding
    assert bool((b >= protected).all()) and bool((b <= length).all())


def test_full_budget_keeps_every_token():
    alloc = allocate(500 * 3 * 2, 500, 10, torch.tensor([0.1, 5.0, 1.0]), torch.rand(3, 2), torch.ones(3, 2))
    assert bool((alloc.head_budgets == 500).all())


def test_importance_moves_budget():
    alloc = allocate(1000 * 2 * 2 // 10, 1000, 10, torch.tensor([1.0, 3.0]), torch.tensor([[1.0, 1.0], [1.0, 9.0]]),
                     torch.ones(2, 2))
    b = alloc.head_budgets
    assert b[1].sum() > b[0].sum()  # the more important layer gets more
    assert b[1, 1] > b[1, 0]  # the more important head gets more


def test_layer_share_is_clamped():
    alloc = allocate(100 * 4 * 1, 100, 0, torch.tensor([1000.0, 0.0, 0.0, 0.0]), torch.ones(4, 1), torch.ones(4, 1),
                     layer_share_range=(0.5, 2.0))
    b = alloc.head_budgets.flatten()
    assert int(b.min()) > 0  # unimportant layers still get at least half their uniform share
    assert int(b.max()) <= 100


def test_tiny_budget_below_protected_is_an_error():
    with pytest.raises(ValueError, match="below the 40 tokens every head must keep"):
        allocate(10, 1000, 40, torch.ones(2), torch.ones(2, 2), torch.ones(2, 2))
