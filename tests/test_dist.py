"""densevit.runtime.dist.deal: how work is shared between torchrun ranks."""
from densevit.runtime import dist


def test_deal_balances_cost_keeps_order_and_loses_nothing():
    items = ["a", "b", "c", "d", "e", "f"]
    costs = [4, 1, 1, 2, 2, 2]
    out = dist.deal(items, costs, 2)
    assert sorted(sum(out, [])) == items                                  # every item once
    assert [sum(costs[items.index(i)] for i in r) for r in out] == [6, 6]  # round-robin would give 7 / 5
    assert all(r == sorted(r) for r in out)                               # each rank keeps the given order
    assert dist.deal(items, costs, 2) == out                              # deterministic
    assert dist.deal(items, costs, 1) == [items]
    assert dist.deal(items[:1], costs[:1], 3) == [["a"], [], []]


def test_single_process_context_takes_everything():
    ctx = dist.DistContext()
    assert ctx.shard([1, 2, 3]) == [1, 2, 3] and ctx.shard([1, 2, 3], [5, 1, 1]) == [1, 2, 3]
