"""Cutting an optimizer step's rows into micro-batches by token budget, on hand-checkable lengths."""

from __future__ import annotations

import random

import pytest

from alignlab.online.micro_batches import token_budget_micro_batches

LENGTHS = [5, 9, 3, 9, 4, 7]


def test_rows_sorted_longest_first_are_cut_within_the_budget():
    # longest first (ties in order): rows 1, 3 (9), 5 (7), 0 (5), 4 (4), 2 (3). Budget 20: 2 × 9 = 18 fits
    # and 3 × 9 does not; 2 × 7 = 14 fits and 3 × 7 = 21 does not; the last two pad to 2 × 4 = 8.
    assert token_budget_micro_batches(LENGTHS, 20) == [[1, 3], [0, 5], [2, 4]]


def test_the_fewest_micro_batches_are_of_about_equal_tokens():
    # budget 53 needs 2 (6 × 9 = 54 does not fit); 3 + 3 rows pad to 27 and 15, where taking rows while
    # they fit would leave 45 and 3
    assert token_budget_micro_batches(LENGTHS, 53) == [[1, 3, 5], [0, 2, 4]]


def test_a_step_that_fits_is_one_micro_batch_in_the_given_order():
    assert token_budget_micro_batches(LENGTHS, 6 * 9) == [[0, 1, 2, 3, 4, 5]]


def test_a_row_longer_than_the_budget_is_a_micro_batch_of_its_own():
    assert token_budget_micro_batches([30, 2, 2], 10) == [[0], [1, 2]]
    assert token_budget_micro_batches([2, 30, 30], 10) == [[1], [2], [0]]


def test_the_row_cap_applies_with_the_budget_and_without_it():
    assert token_budget_micro_batches(LENGTHS, 100, max_rows=4) == [[0, 1, 3, 5], [2, 4]]
    assert token_budget_micro_batches(LENGTHS, 20, max_rows=1) == [[1], [3], [5], [0], [4], [2]]
    # no budget: consecutive rows in their given order, micro_batch_size at a time (or all at once)
    assert token_budget_micro_batches(LENGTHS, None, max_rows=4) == [[0, 1, 2, 3], [4, 5]]
    assert token_budget_micro_batches(LENGTHS, None) == [[0, 1, 2, 3, 4, 5]]
    assert token_budget_micro_batches([], None) == token_budget_micro_batches([], 8) == []


def test_more_micro_batches_halve_the_one_padded_most():
    # [9, 9] (18), [7, 5] (14), [4, 3] (8) → halve 18 → 9, 9, 14, 8 → halve 14
    assert token_budget_micro_batches(LENGTHS, 20, count=5) == [[1], [3], [5], [0], [2, 4]]
    assert token_budget_micro_batches(LENGTHS, 20, count=2) == token_budget_micro_batches(LENGTHS, 20)
    with pytest.raises(ValueError, match="cannot cut 6 rows into 7"):
        token_budget_micro_batches(LENGTHS, 20, count=7)


@pytest.mark.parametrize("seed", range(5))
def test_every_row_once_and_each_micro_batch_within_budget_and_cap(seed):
    rng = random.Random(seed)
    lengths = [rng.randint(1, 40) for _ in range(rng.randint(1, 60))]
    budget, cap = rng.randint(1, 200), rng.choice([None, 3, 7])
    count = rng.choice([None, rng.randint(1, len(lengths))])
    cut = token_budget_micro_batches(lengths, budget, cap, count)
    assert count is None or len(cut) >= count
    assert sorted(i for rows in cut for i in rows) == list(range(len(lengths)))
    longest = [max(lengths[i] for i in rows) for rows in cut]
    assert longest == sorted(longest, reverse=True)  # longest first
    for rows, top in zip(cut, longest):
        assert rows == sorted(rows)
        assert len(rows) * top <= budget or len(rows) == 1
        assert cap is None or len(rows) <= cap


@pytest.mark.parametrize(("budget", "cap"), [(0, None), (10, 0)])
def test_a_budget_or_cap_below_one_is_refused(budget, cap):
    with pytest.raises(ValueError, match="must be >= 1"):
        token_budget_micro_batches(LENGTHS, budget, cap)
