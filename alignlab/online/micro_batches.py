"""Cutting an optimizer step's rows into micro-batches by token count ("dynamic batch size").

A forward/backward over right-padded rows costs about rows × the longest row's tokens. Sorting the
step's rows by length and cutting the sorted list into consecutive pieces whose padded size stays
within a budget puts short rows with short rows, so they do not pay for long ones, and sizes each
forward by what it holds rather than by a row count: the field's "dynamic batch size" (verl's
`use_dynamic_bsz` with `ppo_max_token_len_per_gpu`, NeMo RL's dynamic batching with `train_mb_tokens`).
The step's gradient does not depend on the cut, because every loss divides by the step's totals
(alignlab.losses.reduction.step_mean).
"""

from __future__ import annotations

from collections.abc import Sequence


def token_budget_micro_batches(
    lengths: Sequence[int], max_tokens: int | None, max_rows: int | None = None
) -> list[list[int]]:
    """Positions of the rows of one optimizer step, cut into micro-batches.

    Args:
        lengths: [N] tokens each row actually uses (prompt + answer, without padding).
        max_tokens: the most padded tokens per micro-batch, rows × the longest of them. The rows are
            sorted longest first (ties in their given order) and cut greedily into consecutive
            pieces; a row longer than the budget on its own is a micro-batch by itself. None: no
            budget, the rows stay in their given order.
        max_rows: the most rows per micro-batch (None: no row cap).
    Returns:
        micro-batches longest first, each a list of positions into `lengths`; together they hold every
        position once. Within a micro-batch the positions are ascending (the rows' given order), so a
        step that fits one micro-batch is the rows exactly as given.
    Raises:
        ValueError: when `max_tokens` or `max_rows` is below 1.
    """
    for name, value in (("max_tokens", max_tokens), ("max_rows", max_rows)):
        if value is not None and value < 1:
            raise ValueError(f"{name} must be >= 1 or None, got {value}")
    n = len(lengths)
    cap = max_rows or max(n, 1)
    if max_tokens is None:
        return [list(range(start, min(start + cap, n))) for start in range(0, n, cap)]
    order = sorted(range(n), key=lambda i: -lengths[i])  # stable: ties keep their given order
    pieces: list[list[int]] = []
    for i in order:
        # longest first: the piece's first row is its longest, so its padded size is rows × that length
        if pieces and len(pieces[-1]) < cap and (len(pieces[-1]) + 1) * lengths[pieces[-1][0]] <= max_tokens:
            pieces[-1].append(i)
        else:
            pieces.append([i])
    return [sorted(piece) for piece in pieces]
