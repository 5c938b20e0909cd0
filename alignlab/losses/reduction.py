"""One masked reduction for every token loss and statistic, and the step's share of it.

`masked_mean` is the mean of the items a mask keeps (answer tokens, response tokens): every loss
and token statistic (clip fractions, KL, entropy) reduces through it. `step_mean` is the same
reduction seen from one micro-batch: its sum over the optimizer step's count.

An optimizer step may be cut into micro-batches (gradient accumulation, PPO/GRPO micro-batches) and
processes (data parallel). Its loss is a token mean over every answer token of the step (token-level
terms) or a mean over every row of the step (row-level terms), whatever the cut. Each micro-batch
therefore contributes its *sum* divided by the step's total count ("num_items_in_batch"
normalisation, as in transformers' Trainer and TRL, and OpenRLHF's loss aggregation), times what the
training loop later divides the gradient by (Lightning divides each micro-batch loss by
`accumulate_grad_batches`, DDP averages gradients over processes), so that the summed, averaged
gradients are exactly the step's.
"""

from __future__ import annotations

import torch


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of x where mask is 1: over all elements (a scalar), or along `dim` ([N] for [N, R] and
    dim=1). An empty mask gives 0, not 0/0. x and mask have the same shape."""
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def step_mean(
    values: torch.Tensor,
    mask: torch.Tensor | None = None,
    num_items_in_batch: float | torch.Tensor | None = None,
    scale: float = 1.0,
) -> torch.Tensor:
    """A micro-batch's share of the optimizer step's mean: Σ values·mask · scale / num_items_in_batch.

    Args:
        values: per-item values of one micro-batch on one process: [N, T] per token, or [B] per row.
        mask: 1 on the items that count (e.g. answer tokens), values' shape; None: every item counts.
        num_items_in_batch: the step's total count of the items the mean runs over (answer tokens or
            rows, over every micro-batch and process); None: this micro-batch's own count (its plain
            mean). Below 1 it counts as 1, so an empty step gives 0, not 0/0.
        scale: what the training loop divides the micro-batch's gradient by before the optimizer
            step (accumulate_grad_batches × processes under Lightning's automatic optimisation and
            DDP); 1 when the caller adds the micro-batches' gradients itself on one process.
    Returns:
        a scalar in values' dtype. Divided by `scale` and summed over the step's micro-batches and
        processes, it is the step's mean. With neither a step count nor a scale it is masked_mean.
    """
    if mask is not None:
        mask = mask.to(values.dtype)
        values = values * mask
    own = values.numel() if mask is None else mask.sum()
    count = own if num_items_in_batch is None else num_items_in_batch
    count = torch.as_tensor(count, dtype=values.dtype, device=values.device).clamp(min=1)
    return values.sum() * scale / count
