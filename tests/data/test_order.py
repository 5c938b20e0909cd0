"""The pure cutting rules of micro-batches by tokens (alignlab.data.order), on hand-checkable lengths."""

from __future__ import annotations

import random

import pytest

from alignlab.data.order import balanced_cut, cut_count, padded_tokens

LENGTHS = [60, 59, 58, 57, 5, 4, 3, 1]  # longest first, as a step's rows are sorted


def test_cut_count_is_the_fewest_micro_batches_within_the_budget():
    assert padded_tokens([60, 59], 1) == 120 and padded_tokens([60, 59, 58], 2) == 120  # process 0: 2 rows
    assert cut_count(LENGTHS, 120) == 3  # [60, 59] [58, 57] [5, 4, 3, 1]
    assert cut_count(LENGTHS, 119) == 4  # [60] (2 × 60 > 119), [59, 58], [57, 5], [4, 3, 1]
    assert cut_count(LENGTHS, 10**6) == 1
    assert cut_count(LENGTHS, 1) == 8  # every row over the budget is a micro-batch of its own
    assert cut_count(LENGTHS, 120, world=2) == 2  # [60, 59, 58, 57]: 2 rows a process × 60; then the rest


def test_balanced_cut_gives_exactly_the_count_with_the_smallest_largest_micro_batch():
    assert balanced_cut(LENGTHS, 3) == [2, 2, 4]
    assert balanced_cut(LENGTHS, 1) == [8]
    assert balanced_cut(LENGTHS, 8) == [1] * 8
    assert balanced_cut(LENGTHS, 2, world=2) == [4, 4]  # every micro-batch gives each process a row
    with pytest.raises(ValueError, match="cannot cut 8 rows into 5 micro-batches of at least 2 rows"):
        balanced_cut(LENGTHS, 5, world=2)


@pytest.mark.parametrize("world", [1, 2, 3])
def test_balanced_cut_on_random_steps_holds_every_row_once_within_the_fewest_budget(world):
    rng = random.Random(world)
    for _ in range(200):
        lengths = sorted((rng.randint(1, 500) for _ in range(rng.randint(world, 40))), reverse=True)
        budget = rng.randint(1, 4000)
        count = cut_count(lengths, budget, world)
        sizes = balanced_cut(lengths, min(count, len(lengths) // world), world)
        assert sum(sizes) == len(lengths) and all(n >= world for n in sizes)
        starts = [sum(sizes[:i]) for i in range(len(sizes))]
        costs = [padded_tokens(lengths[s : s + n], world) for s, n in zip(starts, sizes)]
        if count <= len(lengths) // world:  # within the budget, but for micro-batches of a row too long
            assert all(c <= budget or n == world for c, n in zip(costs, sizes))
