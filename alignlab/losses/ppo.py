"""PPO's clipped policy and value losses, per token over response masks."""

from __future__ import annotations

from typing import NamedTuple

import torch

from alignlab.losses.reduction import masked_mean, step_mean


class PolicyLossOutput(NamedTuple):
    loss: torch.Tensor
    clipfrac: torch.Tensor  # share of tokens where the clipped term was the larger loss
    approxkl: torch.Tensor  # ½·mean((log π − log π_old)²)
    ratio: torch.Tensor  # mean π / π_old


def ppo_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    cliprange: float = 0.2,
    num_items_in_batch: float | torch.Tensor | None = None,
    scale: float = 1.0,
) -> PolicyLossOutput:
    """Clipped surrogate objective (Schulman et al., 2017), as a loss over response tokens [N, R]:

    ρ = exp(log π − log π_old);  loss_t = max(−A_t·ρ_t, −A_t·clip(ρ_t, 1−ε, 1+ε)).
    The token mean runs over the optimizer step's (the mini-batch's) `num_items_in_batch` tokens on
    every micro-batch and process (None: these N rows' own); see alignlab.losses.reduction.step_mean.
    """
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - cliprange, 1 + cliprange)
    loss = step_mean(torch.max(unclipped, clipped), mask, num_items_in_batch, scale)
    with torch.no_grad():
        clipfrac = masked_mean((clipped > unclipped).float(), mask)
        approxkl = 0.5 * masked_mean(log_ratio**2, mask)
        mean_ratio = masked_mean(ratio, mask)
    return PolicyLossOutput(loss, clipfrac, approxkl, mean_ratio)


def ppo_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    cliprange_value: float = 0.2,
    num_items_in_batch: float | torch.Tensor | None = None,
    scale: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped value loss: ½·max((V − R)², (clip(V, V_old − ε_v, V_old + ε_v) − R)²) per token,
    averaged as ppo_policy_loss averages.

    Returns (loss, clipfrac: share of tokens where the clipped error was the larger).
    """
    clipped_values = torch.clamp(values, old_values - cliprange_value, old_values + cliprange_value)
    unclipped_err, clipped_err = (values - returns) ** 2, (clipped_values - returns) ** 2
    loss = 0.5 * step_mean(torch.max(unclipped_err, clipped_err), mask, num_items_in_batch, scale)
    with torch.no_grad():
        clipfrac = masked_mean((clipped_err > unclipped_err).float(), mask)
    return loss, clipfrac
