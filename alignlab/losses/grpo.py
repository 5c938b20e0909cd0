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


# -- advantage estimators (issue 20): all per completion, [N] in and out ---------------------------
ADVANTAGE_ESTIMATORS = ("grpo", "rloo", "reinforce_plus_plus")
# scale_rewards null takes the estimator's own, ms-swift's defaults (RLOO and REINFORCE++ as their papers have them).
DEFAULT_SCALE_REWARDS = {"grpo": "group", "rloo": "none", "reinforce_plus_plus": "batch"}


def rloo_advantages(
    rewards: torch.Tensor,
    num_generations: int,
    scale_rewards: str = "none",
    eps: float = 1e-4,
    batch_rewards: torch.Tensor | None = None,
) -> torch.Tensor:
    """REINFORCE leave-one-out (Ahmadian et al., 2024, "Back to Basics", eq. 6): A_i = r_i − (1/(G−1))·Σ_{j≠i} r_j,
    the baseline the mean of the OTHER G−1 rewards of its group, = G/(G−1)·(r_i − mean of the group); the G
    advantages of a group sum to zero.

    rewards [B·G], consecutive groups of G = num_generations (>= 2). `scale_rewards` as ms-swift's
    `compute_advantages` combines it with rloo: `none` (the paper's, and the default for rloo), `group`
    (÷ the group's reward std + eps) or `batch` (÷ the std of the whole batch's rewards + eps, `batch_rewards`
    when `rewards` is one process's share). TRL's RLOOTrainer has `normalize_advantages` instead, which
    whitens the advantages over the batch. Stds are unbiased. Raises ValueError for another scale_rewards.
    """
    grouped = rewards.view(-1, num_generations)
    baseline = (grouped.sum(1, keepdim=True) - grouped) / (num_generations - 1)  # the other G−1 rewards' mean
    everyone = rewards if batch_rewards is None else batch_rewards
    return _scaled((grouped - baseline).view(-1), grouped, scale_rewards, eps, lambda: everyone.std())


def reinforce_plus_plus_advantages(
    rewards: torch.Tensor,
    num_generations: int,
    scale_rewards: str = "batch",
    eps: float = 1e-4,
    batch_rewards: torch.Tensor | None = None,
) -> torch.Tensor:
    """REINFORCE++ with its group baseline (Hu, 2025, arXiv 2501.03262, "REINFORCE++-baseline"): each reward
    minus its group's mean, then normalised over the WHOLE global batch, A = (c − mean_batch c) / (std_batch c
    + eps) with c_i = r_i − mean of its group. Every group's c sums to zero, so mean_batch c is 0 and this is
    c / (std_batch c + eps): ms-swift's `reinforce_plus_plus` (swift/rl_core/advantage.py), which this follows,
    per completion. (verl's `reinforce_plus_plus_baseline` whitens the same c over tokens instead, so a long
    completion weighs more in the batch statistics; OpenRLHF's `reinforce_baseline` likewise.)

    rewards [B·G]; `batch_rewards`: the whole batch's rewards (every process's, whole groups) when `rewards`
    is one process's share. `scale_rewards` as ms-swift combines it: `batch` (the paper's, the default for
    this estimator), `group` (÷ the group's std: GRPO's advantages), `none` (c itself). Stds are unbiased.
    Raises ValueError for another scale_rewards.
    """
    grouped = rewards.view(-1, num_generations)
    everyone = (rewards if batch_rewards is None else batch_rewards).view(-1, num_generations)
    batch_std = lambda: (everyone - everyone.mean(1, keepdim=True)).std()  # noqa: E731  (of c over the global batch)
    return _scaled((grouped - grouped.mean(1, keepdim=True)).view(-1), grouped, scale_rewards, eps, batch_std)


def _scaled(advantages: torch.Tensor, grouped: torch.Tensor, scale_rewards: str, eps: float, batch_std) -> torch.Tensor:
    """`advantages` [B·G] ÷ (the group's reward std + eps) for `group`, ÷ (batch_std() + eps) for `batch`,
    as they are for `none`. Raises ValueError for another scale_rewards."""
    if scale_rewards == "none":
        return advantages
    if scale_rewards == "group":
        return advantages / (grouped.std(1).repeat_interleave(grouped.shape[1]) + eps)
    if scale_rewards == "batch":
        return advantages / (batch_std() + eps)
    raise ValueError(f"scale_rewards must be one of {SCALE_REWARDS}, got {scale_rewards!r}")


def estimate_advantages(
    rewards: torch.Tensor,
    num_generations: int,
    advantage_estimator: str = "grpo",
    scale_rewards: str | None = None,
    batch_rewards: torch.Tensor | None = None,
) -> torch.Tensor:
    """[B·G] advantages by `advantage_estimator` (`grpo`: group_advantages, `rloo`: rloo_advantages,
    `reinforce_plus_plus`: reinforce_plus_plus_advantages); `scale_rewards` None: the estimator's own
    (DEFAULT_SCALE_REWARDS). Raises ValueError for an unknown estimator or scaling."""
    functions = {
        "grpo": group_advantages,
        "rloo": rloo_advantages,
        "reinforce_plus_plus": reinforce_plus_plus_advantages,
    }
    if advantage_estimator not in functions:
        raise ValueError(f"advantage_estimator must be one of {ADVANTAGE_ESTIMATORS}, got {advantage_estimator!r}")
    scale = DEFAULT_SCALE_REWARDS[advantage_estimator] if scale_rewards is None else scale_rewards
    return functions[advantage_estimator](rewards, num_generations, scale, batch_rewards=batch_rewards)


def kl_reward_penalty(
    old_logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor, beta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The KL to the reference as a reward penalty (`kl_in_reward`): each completion token's reward gets
    −β·k1_t, k1_t = log π_old − log π_ref (the first-order log ratio, as TRL's RLOOTrainer and ms-swift
    use; Ahmadian et al., 2024), and the estimators are outcome estimators (γ = 1): a completion's return is
    its reward plus its tokens' penalties, r_i − β·Σ_t k1_t, the value they see (verl's grpo/rloo sum the
    token-level rewards the same way).

    old_logprobs, ref_logprobs, mask [N, R] (the policy at generation time, the reference, 1 on the
    completion's tokens). Returns (the penalty β·Σ_t k1_t per completion [N] to subtract from the rewards,
    the token-mean k1 over the batch: a scalar for logging as `kl`).
    """
    mask = mask.to(old_logprobs.dtype)
    k1 = (old_logprobs - ref_logprobs) * mask
    return beta * k1.sum(1), k1.sum() / mask.sum().clamp(min=1)


def soft_overlong_penalty(lengths: torch.Tensor, max_length: int, cache_length: int) -> torch.Tensor:
    """DAPO's overlong reward shaping (Yu et al., 2025, eq. 13): with L_max = `max_length` and L_cache =
    `cache_length`, a completion of |y| tokens gets 0 while |y| <= L_max − L_cache, then
    ((L_max − L_cache) − |y|) / L_cache, falling linearly to −1 at L_max, and −1 beyond.

    lengths [N] completion lengths in tokens; returns [N] penalties in [−1, 0] (float64 for integer
    lengths, else their dtype). Raises ValueError unless 0 < cache_length <= max_length.
    """
    if not 0 < cache_length <= max_length:
        raise ValueError(f"soft overlong needs 0 < cache_length <= max_length, got {cache_length} and {max_length}")
    lengths = lengths if lengths.is_floating_point() else lengths.double()
    start = max_length - cache_length
    return ((start - lengths) / cache_length).clamp(min=-1.0, max=0.0)


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
