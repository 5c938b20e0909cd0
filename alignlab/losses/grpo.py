"""GRPO: group-relative advantages and the clipped, optionally KL-regularised token loss, with its
variants: sequence-level importance ratios (GSPO), CISPO and SAPO objectives, two-sided clipping,
training on the high-entropy tokens only, and an entropy bonus."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from alignlab.losses.reduction import masked_mean, step_mean

CLIP_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")  # the clipped objective, aggregated four ways
GRPO_LOSS_TYPES = (*CLIP_LOSS_TYPES, "cispo", "sapo")
IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence", "sequence_token")
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


# -- advantage estimators: all per completion, [N] in and out ---------------------------
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


def importance_weights(
    logprobs: torch.Tensor, old_logprobs: torch.Tensor, mask: torch.Tensor, level: str = "token"
) -> torch.Tensor:
    """The importance ratio π/π_old the objective weighs each token by.

    Args:
        logprobs, old_logprobs, mask: [N, R], completion tokens of N completions.
        level: `token`: ρ_t = exp(log π_t − log π_old,t), [N, R] (GRPO). `sequence` (GSPO, Zheng et
            al., 2025, arXiv:2507.18071, eq. 7): the length-normalised sequence ratio s_i = exp(mean over the
            completion's tokens of log π − log π_old), [N, 1] (1 for a completion without tokens).
            `sequence_token` (GSPO-token, eq. 13): sg[s_i]·π_t/sg[π_t], [N, R]: every value is s_i,
            the gradient s_i·∇log π_t flows through each token.
    Raises:
        ValueError: an unknown level.
    """
    if level == "token":
        return torch.exp(logprobs - old_logprobs)
    log_s = masked_mean(logprobs - old_logprobs, mask, dim=1).unsqueeze(1)
    if level == "sequence":
        return torch.exp(log_s)
    if level == "sequence_token":
        return torch.exp(log_s.detach() + logprobs - logprobs.detach())
    raise ValueError(f"importance_sampling_level must be one of {IMPORTANCE_SAMPLING_LEVELS}, got {level!r}")


def clipped_objective(
    ratio: torch.Tensor, advantages: torch.Tensor, epsilon: float, epsilon_high: float, delta: float | None = None
) -> torch.Tensor:
    """−min(ρ·A, clip(ρ, 1−ε, 1+ε_high)·A) (PPO's clip, Schulman et al., 2017; DAPO's ε_high).

    `delta` (two-sided clipping, INTELLECT-2, 2025, arXiv:2505.07291; TRL's `delta`): the unclipped term's ratio is
    clamped at δ, min(ρ, δ)·A. For δ > 1+ε_high this changes only tokens with A < 0 (for A > 0 the
    clipped term, at most (1+ε_high)·A, is already the smaller), capping how hard a negative
    advantage pushes a token whose ratio has grown. ratio [N, R] or [N, 1]; advantages [N, 1].
    """
    clipped = torch.clamp(ratio, 1 - epsilon, 1 + epsilon_high)
    if delta is not None:
        ratio = torch.clamp(ratio, max=delta)
    return -torch.min(ratio * advantages, clipped * advantages)


def cispo_objective(
    ratio: torch.Tensor, advantages: torch.Tensor, logprobs: torch.Tensor, epsilon_high: float
) -> torch.Tensor:
    """−sg[min(ρ, ε_high)]·A·log π (CISPO, MiniMax-M1, 2025, arXiv:2506.13585, eq. 4): the importance weight is capped
    and carries no gradient, so every token keeps its policy gradient, weighted by the capped ratio.

    The cap is `epsilon_high` itself, as TRL and ms-swift read it (ScaleRL's ε_max, arXiv:2510.13786,
    which uses 5.0); MiniMax-M1's 1 + ε^IS_high is epsilon_high = 1 + ε^IS_high. There is no lower
    bound (MiniMax-M1 sets ε^IS_low large). ratio [N, R] or [N, 1]; advantages [N, 1]; logprobs [N, R].
    """
    return -torch.clamp(ratio, max=epsilon_high).detach() * advantages * logprobs


def sapo_objective(
    ratio: torch.Tensor, advantages: torch.Tensor, temperature_pos: float = 1.0, temperature_neg: float = 1.05
) -> torch.Tensor:
    """−(4/τ)·σ(τ·(ρ − 1))·A (SAPO, Qwen, 2025, arXiv:2511.20347, as TRL implements it): a smooth gate of the
    ratio instead of the hard clip. Its gradient in ρ, 4·σ·(1−σ)·A, is A at ρ = 1 (GRPO's on-policy
    gradient) and fades smoothly as ρ moves away. τ = `temperature_pos` for A > 0, `temperature_neg`
    otherwise (larger: the gradient of negative-advantage tokens fades faster). ratio [N, R] or
    [N, 1]; advantages [N, 1].
    """
    tau = torch.where(advantages > 0, advantages.new_tensor(temperature_pos), advantages.new_tensor(temperature_neg))
    return -torch.sigmoid(tau * (ratio - 1)) * 4 / tau * advantages


def entropy_threshold(entropy: torch.Tensor, mask: torch.Tensor, top_entropy_quantile: float) -> torch.Tensor:
    """The entropy at or above which a token is in the top `top_entropy_quantile` share of the tokens
    `mask` keeps: their (1 − q)-quantile, linearly interpolated as torch.quantile computes it (TRL's
    get_high_entropy_mask; Wang et al., 2025, "Beyond the 80/20 rule", arXiv:2506.01939). entropy, mask: any one shape
    (e.g. [N, R], every token of the step). Returns a detached scalar; +inf when the mask keeps none.
    Sorts instead of calling torch.quantile, which refuses inputs above 2^24 elements."""
    values = torch.sort(entropy.detach()[mask.bool()]).values
    if values.numel() == 0:
        return entropy.new_tensor(math.inf)
    position = (1 - top_entropy_quantile) * (values.numel() - 1)
    low = math.floor(position)
    high = min(low + 1, values.numel() - 1)
    return torch.lerp(values[low], values[high], position - low)


def high_entropy_mask(entropy: torch.Tensor, mask: torch.Tensor, threshold: torch.Tensor | float) -> torch.Tensor:
    """1 on the tokens of `mask` whose entropy is at least `threshold` (entropy_threshold), else 0:
    the tokens the policy loss keeps under top_entropy_quantile. entropy, mask [N, R]; in mask's dtype."""
    return mask * (entropy.detach() >= threshold).to(mask.dtype)


class GRPOLossOutput(NamedTuple):
    loss: torch.Tensor
    per_token: torch.Tensor  # [N, R] per-token loss (0 outside the mask)
    kl: torch.Tensor | None  # mean k3 KL over tokens, when a reference is given
    clip_low: torch.Tensor | None  # share of clip units with A < 0 and ρ < 1 − ε_low (clipped loss types)
    clip_high: torch.Tensor | None  # share of clip units with A > 0 and ρ > 1 + ε_high (clipped loss types)
    cispo_clip: torch.Tensor | None = None  # share of clip units with A > 0 and ρ > ε_high (cispo)
    entropy: torch.Tensor | None = None  # mean policy entropy over the mask's tokens, when given
    clip_units: torch.Tensor | None = None  # what the clip shares count: tokens, or completions (sequence ratios)


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
    *,
    importance_sampling_level: str = "token",
    delta: float | None = None,
    sapo_temperature_pos: float = 1.0,
    sapo_temperature_neg: float = 1.05,
    entropy: torch.Tensor | None = None,
    entropy_coef: float = 0.0,
    entropy_mask: torch.Tensor | None = None,
    rollout_weights: torch.Tensor | None = None,
) -> GRPOLossOutput:
    """per_token = (w·objective − entropy_coef·H)·entropy_mask + β·k3(π, π_ref), aggregated by loss_type.

    logprobs, old_logprobs, ref_logprobs, mask, entropy, entropy_mask [N, R]; advantages [N] (one
    per completion). The ratio ρ is importance_weights(…, `importance_sampling_level`): per token
    (default), per sequence (GSPO: one ratio and its clip per completion) or GSPO-token. The
    objective, by `loss_type`: the clipped −min(ρ·A, clip(ρ, 1−ε, 1+ε_high)·A) (clipped_objective,
    with `delta` two-sided clipping), `cispo` (cispo_objective, capped at ε_high) or `sapo`
    (sapo_objective, temperatures `sapo_temperature_pos`/`_neg`). `entropy_mask` (high_entropy_mask,
    top_entropy_quantile) keeps the policy term on some tokens only; `entropy_coef`·H (the policy's
    per-token entropy `entropy`, with its gradient) is subtracted from each token's loss, on the same
    tokens, so the bonus is averaged as the policy loss is. The KL term is on every token.
    `rollout_weights` w [N, R] (no gradient; None: 1): the rollout engine's truncated importance weights
    (alignlab.losses.rollout_correction.truncated_importance_weights), on the policy term only, as TRL.
    Aggregation (`loss_type`), over the optimizer step's `num_items_in_batch` completion tokens and
    `num_completions` completions (every micro-batch and process; None: these N rows' own):
    - grpo, sapo: mean over completions of each completion's token mean (DeepSeekMath); row-level
    - bnpo, dapo, cispo: token sum / the step's tokens (DAPO). TRL's bnpo divides by each
      micro-batch's own tokens, so its step depends on the micro-batching; here it is the step's
      token mean, the same loss as dapo
    - dr_grpo: token sum / (completions · max_completion_length) (Dr. GRPO: no length bias)
    Each is a micro-batch's share of the step (alignlab.losses.reduction.step_mean, with `scale`).
    Raises ValueError for an unknown loss_type or importance_sampling_level, or an entropy_coef
    without `entropy`.
    """
    mask = mask.to(logprobs.dtype)
    ratio = importance_weights(logprobs, old_logprobs, mask, importance_sampling_level)
    a = advantages.unsqueeze(1)
    high = epsilon if epsilon_high is None else epsilon_high
    if loss_type in CLIP_LOSS_TYPES:
        per_token = clipped_objective(ratio, a, epsilon, high, delta)
    elif loss_type == "cispo":
        per_token = cispo_objective(ratio, a, logprobs, high)
    elif loss_type == "sapo":
        per_token = sapo_objective(ratio, a, sapo_temperature_pos, sapo_temperature_neg)
    else:
        raise ValueError(f"loss_type must be one of {GRPO_LOSS_TYPES}, got {loss_type!r}")
    if rollout_weights is not None:
        per_token = per_token * rollout_weights
    if entropy_coef != 0.0:
        if entropy is None:
            raise ValueError("grpo_loss: entropy_coef needs the policy's per-token entropy")
        per_token = per_token - entropy_coef * entropy
    if entropy_mask is not None:
        per_token = per_token * entropy_mask
    kl = None
    if beta != 0.0:
        token_kl = k3_kl(logprobs, ref_logprobs)
        per_token = per_token + beta * token_kl
        kl = masked_mean(token_kl, mask)
    per_token = per_token * mask
    if loss_type in ("grpo", "sapo"):
        loss = step_mean(masked_mean(per_token, mask, dim=1), None, num_completions, scale)
    elif loss_type in ("bnpo", "dapo", "cispo"):  # every completion masked out: loss 0, not 0/0
        loss = step_mean(per_token, mask, num_items_in_batch, scale)
    else:  # dr_grpo
        rows = per_token.shape[0] if num_completions is None else num_completions
        loss = step_mean(per_token, mask, rows * (max_completion_length or per_token.shape[1]), scale)
    with torch.no_grad():
        # Clip shares count tokens, or completions (with a token) when the ratio is one per sequence, as TRL's
        units = mask if ratio.shape[1] == mask.shape[1] else (mask.sum(1, keepdim=True) > 0).to(mask.dtype)
        clip_low = clip_high = cispo_clip = None
        if loss_type in CLIP_LOSS_TYPES:
            clip_low = masked_mean(((ratio < 1 - epsilon) & (a < 0)).to(mask.dtype), units)
            clip_high = masked_mean(((ratio > 1 + high) & (a > 0)).to(mask.dtype), units)
        elif loss_type == "cispo":
            cispo_clip = masked_mean(((ratio > high) & (a > 0)).to(mask.dtype), units)
        mean_entropy = None if entropy is None else masked_mean(entropy.detach(), mask)
    return GRPOLossOutput(loss, per_token, kl, clip_low, clip_high, cispo_clip, mean_entropy, units.sum())
