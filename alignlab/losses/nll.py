"""Negative log-likelihood of answer tokens, the SFT objective and DPO's RPO term."""

from __future__ import annotations

import torch

from alignlab.losses.reduction import step_mean


def nll_loss(
    token_logps: torch.Tensor,
    mask: torch.Tensor,
    num_items_in_batch: float | torch.Tensor | None = None,
    scale: float = 1.0,
) -> torch.Tensor:
    """Mean NLL per answer token over the whole optimizer step.

    -Σ_{i,t} m_it · log π(y_it) · scale / num_items_in_batch, with token_logps and mask both [N, T];
    `num_items_in_batch` is the step's answer-token count over every micro-batch and process (None:
    this batch's own, -Σ m·log π / Σ m). Token-weighted (not a mean of per-row means), as in
    standard SFT; see alignlab.losses.reduction.step_mean for `scale`.
    """
    return step_mean(-token_logps, mask, num_items_in_batch, scale)
