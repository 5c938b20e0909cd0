"""PPO's clipped policy and value losses, per token over response masks; the clipped surrogate GRPO shares."""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch

from alignlab.losses.reduction import masked_mean, step_mean
from alignlab.losses.rlhf import kl_estimate


class PolicyLossOutput(NamedTuple):
    loss: torch.Tensor  # what to backpropagate: pg_loss (+ kl_coef·KL term) (− entropy_coef·entropy term)
    clipfrac: torch.Tensor  # share of tokens where the clipped term was the larger loss
    approxkl: torch.Tensor  # ½·mean((log π − log π_old)²)
    ratio: torch.Tensor  # mean π / π_old
    pg_loss: torch.Tensor | None = None  # the clipped surrogate alone (the micro-batch's share of the step's)
    kl: torch.Tensor | None = None  # the KL term before kl_coef (its share of the step's), when `kl` is given
    dual_clipfrac: torch.Tensor | None = None  # share of tokens (A < 0) bounded by −c·A, with dual_clip


def clipped_objective(
    ratio: torch.Tensor,
    advantages: torch.Tensor,
    epsilon: float,
    epsilon_high: float | None = None,
    delta: float | None = None,
) -> torch.Tensor:
    """The clipped surrogate as a loss, −min(ρ·A, clip(ρ, 1−ε, 1+ε_high)·A) (PPO, Schulman et al., 2017;
    DAPO's ε_high, Yu et al., 2025; None: ε), per token: PPO's and GRPO's one spelling. Equal, bit for
    bit, to max(−A·ρ, −A·clip(ρ)): negation is exact.

    `delta` (two-sided clipping, INTELLECT-2, 2025, arXiv:2505.07291; TRL's `delta`): the unclipped term's
    ratio is clamped at δ, min(ρ, δ)·A. For δ > 1+ε_high this changes only tokens with A < 0 (for A > 0 the
    clipped term, at most (1+ε_high)·A, is already the smaller), capping how hard a negative advantage
    pushes a token whose ratio has grown. ratio and advantages broadcast together ([N, R], [N, 1]).
    """
    high = epsilon if epsilon_high is None else epsilon_high
    clipped = torch.clamp(ratio, 1 - epsilon, 1 + high)
    if delta is not None:
        ratio = torch.clamp(ratio, max=delta)
    return -torch.min(ratio * advantages, clipped * advantages)


def dual_clip_bound(
    per_token: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, dual_clip: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dual clip (Ye et al., 2020, "Mastering Complex Control in MOBA Games with Deep Reinforcement
    Learning", eq. 5; OpenRLHF's `dual_clip`, verl's `clip_ratio_c`): where A_t < 0 the loss is also
    bounded by −c·A_t, loss_t = min(loss_t, −c·A_t) (c > 1), so a token whose ratio has grown far past
    1 + ε under a negative advantage stops pushing with an unbounded weight ρ; A_t >= 0 is unchanged.
    per_token, advantages, mask [N, R]. Returns (the bounded per_token, the share of `mask`'s tokens bounded)."""
    bound = -dual_clip * advantages
    negative = advantages < 0
    with torch.no_grad():
        share = masked_mean((negative & (per_token > bound)).to(per_token.dtype), mask)
    return torch.where(negative, torch.min(per_token, bound), per_token), share


def ppo_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    cliprange: float = 0.2,
    num_items_in_batch: float | torch.Tensor | None = None,
    scale: float = 1.0,
    dual_clip: float | None = None,
    entropy: torch.Tensor | None = None,
    entropy_coef: float = 0.0,
    kl: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    rollout_weights: torch.Tensor | None = None,
) -> PolicyLossOutput:
    """Clipped surrogate objective (Schulman et al., 2017), as a loss over response tokens [N, R]:
    ρ = exp(log π − log π_old), loss_t = clipped_objective(ρ_t, A_t, ε) = max(−A_t·ρ_t, −A_t·clip(ρ_t, 1±ε)),
    with `dual_clip` c: dual_clip_bound. `rollout_weights` w_t [N, R] (no gradient; None: 1) multiply each
    token's clipped term: the rollout engine's truncated importance weights (alignlab.losses.rollout_correction).

    Added terms, each a token mean of the same reduction (verl's actor loss):
        + kl_coef · mean_t KL_t         with `kl` [N, R] a per-token KL estimate to the reference
                                         (alignlab.losses.rlhf.kl_estimate; verl's `use_kl_loss`);
        − entropy_coef · mean_t H_t     with `entropy` [N, R] the policy's per-token entropy, carrying
                                         its gradient (an entropy bonus; verl's `entropy_coeff`).

    The token mean runs over the optimizer step's (the mini-batch's) `num_items_in_batch` tokens on
    every micro-batch and process (None: these N rows' own); see alignlab.losses.reduction.step_mean.
    """
    ratio = torch.exp(logprobs - old_logprobs)
    per_token = clipped_objective(ratio, advantages, cliprange)
    with torch.no_grad():
        clipfrac = masked_mean((per_token > -advantages * ratio).float(), mask)  # the clipped term was the larger
        approxkl = masked_mean(kl_estimate(old_logprobs, logprobs, "k2"), mask)  # ½·(log π − log π_old)²
        mean_ratio = masked_mean(ratio, mask)
    dual_clipfrac = None
    if dual_clip is not None:
        per_token, dual_clipfrac = dual_clip_bound(per_token, advantages, mask, dual_clip)
    if rollout_weights is not None:
        per_token = per_token * rollout_weights
    step = functools.partial(step_mean, mask=mask, num_items_in_batch=num_items_in_batch, scale=scale)
    pg_loss = step(per_token)
    kl_term = None if kl is None else step(kl)
    loss = pg_loss if kl_term is None else pg_loss + kl_coef * kl_term
    if entropy is not None and entropy_coef != 0.0:
        loss = loss - entropy_coef * step(entropy)
    kl_term = None if kl_term is None else kl_term.detach()
    return PolicyLossOutput(loss, clipfrac, approxkl, mean_ratio, pg_loss, kl_term, dual_clipfrac)


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
