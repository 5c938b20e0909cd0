"""Cutting an optimizer step's rows into micro-batches by token count ("dynamic batch size").

A forward/backward over right-padded rows costs about rows × the longest row's tokens. Sorting the
step's rows by length and cutting the sorted list into consecutive pieces whose padded size stays
within a budget (as the offline data cuts its steps, alignlab.data.order) puts short rows with short
rows, so they do not pay for long ones, and sizes each forward by what it holds rather than by a row
count: the field's "dynamic batch size" (verl's `use_dynamic_bsz` with `ppo_max_token_len_per_gpu`,
NeMo RL's dynamic batching with `train_mb_tokens`). The step's gradient does not depend on the cut,
because every loss divides by the step's totals (alignlab.losses.reduction.step_mean).
"""

from __future__ import annotations

from collections.abc import Sequence

from alignlab.data.order import balanced_cut, cut_count, padded_tokens


def token_budget_micro_batches(
    lengths: Sequence[int], max_tokens: int | None, max_rows: int | None = None, count: int | None = None
) -> list[list[int]]:
    """Positions of the rows of one optimizer step, cut into micro-batches.

    Args:
        lengths: [N] tokens each row actually uses (prompt + answer, without padding).
        max_tokens: the most padded tokens per micro-batch, rows × the longest of them. The rows are
            sorted longest first (ties in their given order) and cut into consecutive pieces: the
            fewest that keep each within the budget, of about equal padded tokens (the offline data's
            cut, alignlab.data.order.cut_count and balanced_cut); a row longer than the budget on its
            own is a micro-batch by itself. None: no budget, the rows stay in their given order.
        max_rows: the most rows per micro-batch (None: no row cap); a piece with more rows is cut
            into consecutive pieces of at most that many.
        count: at least this many micro-batches (at most N): the piece padded to the most tokens is
            halved until there are (so that every process takes as many backward passes; DDP
            synchronises each). None: as many as the budget and the cap need.
    Returns:
        micro-batches longest first, each a list of positions into `lengths`; together they hold every
        position once. Within a micro-batch the positions are ascending (the rows' given order), so a
        step that fits one micro-batch is the rows exactly as given.
    Raises:
        ValueError: when `max_tokens` or `max_rows` is below 1, or `count` above N.
    """
    for name, value in (("max_tokens", max_tokens), ("max_rows", max_rows)):
        if value is not None and value < 1:
            raise ValueError(f"{name} must be >= 1 or None, got {value}")
    if count is not None and count > len(lengths):
        raise ValueError(f"cannot cut {len(lengths)} rows into {count} micro-batches")
    if not lengths:
        return []
    if max_tokens is None:
        order, sizes = list(range(len(lengths))), [len(lengths)]
    else:
        order = sorted(range(len(lengths)), key=lambda i: -lengths[i])  # stable: ties keep their given order
        longest_first = [lengths[i] for i in order]
        sizes = balanced_cut(longest_first, cut_count(longest_first, max_tokens))
    cap = max_rows or len(lengths)
    sizes = [min(cap, size - at) for size in sizes for at in range(0, size, cap)]
    pieces = [order[sum(sizes[:i]) : sum(sizes[: i + 1])] for i in range(len(sizes))]
    while count is not None and len(pieces) < count:
        cost = [padded_tokens(sorted((lengths[r] for r in rows), reverse=True)) for rows in pieces]
        i = max((j for j, rows in enumerate(pieces) if len(rows) > 1), key=cost.__getitem__)
        half = len(pieces[i]) // 2
        pieces[i : i + 1] = [pieces[i][:half], pieces[i][half:]]
    return [sorted(rows) for rows in pieces]
