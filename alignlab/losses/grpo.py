"""GRPO: group-relative advantages and the clipped, optionally KL-regularised token loss."""

from __future__ import annotations

from typing import NamedTuple

import torch

from alignlab.losses.reduction import masked_mean, step_mean

GRPO_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
SCALE_REWARDS = ("group", "batch", "none")


def group_advantages(
    rewards: torch.Tensor,
    num_generations: int,
    scale_rewards: str = "group",
    eps: float = 1e-4,
    batch_rewards: torch.Tensor | None = None,
) -> torch.Tensor:
    """A_i = (r_i − mean of its group) / (std + eps) (Shao et al., 2024, DeepSeekMath §4.1.2).

    rewards [B·G], consecutive groups of G = num_generations answers to one prompt. The std is the
    group's (`group`), the whole batch's (`batch`), or none (`none`, Dr. GRPO, Liu et al., 2025).
    Standard deviations are unbiased (Bessel's correction). `batch_rewards`: the whole batch's
    rewards when `rewards` is one process's share of it (for the `batch` std; default `rewards`).
    """
    grouped = rewards.view(-1, num_generations)
    centred = (grouped - grouped.mean(1, keepdim=True)).view(-1)
    if scale_rewards == "group":
        return centred / (grouped.std(1).repeat_interleave(num_generations) + eps)
    if scale_rewards == "batch":
        return centred / ((rewards if batch_rewards is None else batch_rewards).std() + eps)
    if scale_rewards == "none":
        return centred
    raise ValueError(f"scale_rewards must be one of {SCALE_REWARDS}, got {scale_rewards!r}")


def k3_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Per-token KL estimate exp(ref − log π) − (ref − log π) − 1 ≥ 0 (Schulman's k3)."""
    diff = ref_logprobs - logprobs
    return torch.exp(diff) - diff - 1


class GRPOLossOutput(NamedTuple):
    loss: torch.Tensor
    per_token: torch.Tensor  # [N, R] per-token loss (0 outside the mask)
    kl: torch.Tensor | None  # mean k3 KL over tokens, when a reference is given
    clip_low: torch.Tensor  # share of tokens with A < 0 and ρ < 1 − ε_low
    clip_high: torch.Tensor  # share of tokens with A > 0 and ρ > 1 + ε_high


def grpo_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    epsilon: float = 0.2,
    epsilon_high: float | None = None,
    beta: float = 0.0,
    ref_logprobs: torch.Tensor | None = None,
    loss_type: str = "dapo",
    max_completion_length: int | None = None,
    num_items_in_batch: float | torch.Tensor | None = None,
    num_completions: float | torch.Tensor | None = None,
    scale: float = 1.0,
) -> GRPOLossOutput:
    """per_token = −min(ρ·A, clip(ρ, 1−ε, 1+ε_high)·A) + β·k3(π, π_ref), ρ = exp(log π − log π_old).

    logprobs, old_logprobs, ref_logprobs, mask [N, R]; advantages [N] (one per completion).
    Aggregation (`loss_type`), over the optimizer step's `num_items_in_batch` completion tokens and
    `num_completions` completions (every micro-batch and process; None: these N rows' own):
    - grpo: mean over completions of each completion's token mean (DeepSeekMath); row-level
    - bnpo, dapo: token sum / the step's tokens (DAPO). TRL's bnpo divides by each micro-batch's
      own tokens, so its step depends on the micro-batching; here it is the step's token mean, the
      same loss as dapo
    - dr_grpo: token sum / (completions · max_completion_length) (Dr. GRPO: no length bias)
    Each is a micro-batch's share of the step (alignlab.losses.reduction.step_mean, with `scale`).
    """
    mask = mask.to(logprobs.dtype)
    ratio = torch.exp(logprobs - old_logprobs)
    a = advantages.unsqueeze(1)
    high = epsilon if epsilon_high is None else epsilon_high
    per_token = -torch.min(ratio * a, torch.clamp(ratio, 1 - epsilon, 1 + high) * a)
    kl = None
    if beta != 0.0:
        token_kl = k3_kl(logprobs, ref_logprobs)
        per_token = per_token + beta * token_kl
        kl = masked_mean(token_kl, mask)
    per_token = per_token * mask
    if loss_type == "grpo":
        loss = step_mean(masked_mean(per_token, mask, dim=1), None, num_completions, scale)
    elif loss_type in ("bnpo", "dapo"):  # every completion masked out: loss 0, not 0/0
        loss = step_mean(per_token, mask, num_items_in_batch, scale)
    elif loss_type == "dr_grpo":
        rows = per_token.shape[0] if num_completions is None else num_completions
        loss = step_mean(per_token, mask, rows * (max_completion_length or per_token.shape[1]), scale)
    else:
        raise ValueError(f"loss_type must be one of {GRPO_LOSS_TYPES}, got {loss_type!r}")
    with torch.no_grad():
        clip_low = masked_mean(((ratio < 1 - epsilon) & (a < 0)).to(mask.dtype), mask)
        clip_high = masked_mean(((ratio > 1 + high) & (a > 0)).to(mask.dtype), mask)
    return GRPOLossOutput(loss, per_token, kl, clip_low, clip_high)
