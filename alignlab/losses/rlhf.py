"""RLHF math on response-aligned tensors: pure functions, no models or configs.

Shapes: N responses of up to R tokens; `mask` [N, R] is 1 on real response tokens (up to and
including the first stop token: eos or end of turn) and 0 after.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from alignlab.losses.reduction import masked_mean
from alignlab.registry import Registry


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of x where mask is 1; unbiased (Bessel's correction) by default."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    if unbiased:
        n = mask.sum()
        var = var * n / (n - 1).clamp(min=1)
    return var


def masked_whiten(
    x: torch.Tensor,
    mask: torch.Tensor,
    shift_mean: bool = True,
    eps: float = 1e-8,
    total: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """(x − mean) / std over the masked elements (unbiased variance); with shift_mean=False the mean
    is added back. `total` sums a tensor over every process holding part of the batch (None: this
    process holds all of it), so the statistics are the whole batch's."""
    total = total or (lambda t: t)
    mask = mask.to(x.dtype)
    n = total(mask.sum())
    mean = total((x * mask).sum()) / n.clamp(min=1)
    var = total(((x - mean) ** 2 * mask).sum()) / (n - 1).clamp(min=1)
    whitened = (x - mean) * torch.rsqrt(var + eps)
    return whitened if shift_mean else whitened + mean


def last_index(mask: torch.Tensor) -> torch.Tensor:
    """[N] index of the last 1 in each row of mask (0 for an empty row)."""
    positions = torch.arange(mask.shape[-1], device=mask.device).expand_as(mask)
    return (positions * mask).argmax(-1)


# Per-token estimates of KL(π ‖ π_ref) from tokens sampled from π (Schulman, 2020, "Approximating KL
# Divergence", http://joschu.net/blog/kl-approx.html; TRL's and OpenRLHF's `kl_estimator`, verl's `kl_loss_type`).
# Each takes (log π, log π_ref) of the sampled tokens, any one shape, and is 0 where they are equal (masked
# positions holding 0 and 0). PPO's and GRPO's `kl_estimator` name one. Used as a loss term (PPO's
# `use_kl_loss`, GRPO's beta), what counts is the gradient, not the value. Properties:
#   loss_gradient: what E_{y~π}[∇ estimate(y)] is when the tokens are sampled from π itself: "reverse"
#       (∇KL(π ‖ π_ref), the KL the value estimates), "forward" (∇KL(π_ref ‖ π): k3), "zero" (k1), None: unknown.
#   unbiased: E_{y~π}[estimate] = KL(π ‖ π_ref) and the gradient is the value's own, so the ratio-weighted term
#       ρ·estimate, ρ = π/π_old (`use_bias_correction_kl`), has the gradient ∇KL(π ‖ π_ref) from any π_old.
KL_ESTIMATES: Registry[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = Registry(
    "KL estimator", "algorithm.kl_estimator", loss_gradient=None, unbiased=False
)


@KL_ESTIMATES.register("k1", loss_gradient="zero", unbiased=True)
def kl_k1(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """k1 = log π − log π_ref: unbiased, high variance, negative on some tokens. As a loss its gradient is ∇log π,
    0 in expectation."""
    return logprobs - ref_logprobs


@KL_ESTIMATES.register("k2", loss_gradient="reverse")
def kl_k2(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """k2 = ½·(log r)², log r = log π_ref − log π: biased, low variance, >= 0. As a loss its gradient
    (log π − log π_ref)·∇log π is ∇KL(π ‖ π_ref) in expectation over y ~ π (Liu et al., 2025, "Rethinking KL
    Regularization in RLHF", arXiv:2510.01555: on-policy, k2 as a loss is k1 in the reward)."""
    return 0.5 * (ref_logprobs - logprobs) ** 2


@KL_ESTIMATES.register("k3", loss_gradient="forward", unbiased=True)
def kl_k3(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """k3 = (r − 1) − log r, log r = log π_ref − log π: unbiased, low variance, >= 0 (verl's `low_var_kl`,
    GRPO's KL). r − 1 through expm1, exact near r = 1, where a policy close to its reference puts most tokens.
    As a loss its gradient (1 − r)·∇log π is, over y ~ π, −Σ_y π_ref(y)·∇log π(y) = ∇KL(π_ref ‖ π): the
    forward KL, not the one the value estimates (verl PR 2953; "A Comedy of Estimators: On KL Regularization in RL
    Training of LLMs", 2025, arXiv:2512.21852)."""
    log_ratio = ref_logprobs - logprobs
    return torch.expm1(log_ratio) - log_ratio


def _with_k2_gradient(value: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """`value` to the bit, with k2's gradient (straight-through: k2 − k2.detach() is exactly 0)."""
    k2 = kl_k2(logprobs, ref_logprobs)
    return value.detach() + (k2 - k2.detach())


@KL_ESTIMATES.register("k1+", loss_gradient="reverse")
def kl_k1_plus(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """verl's `k1+`: k1's value, k2's gradient (verl `kl_penalty`, PR 2953), so ∇KL(π ‖ π_ref) on-policy."""
    return _with_k2_gradient(kl_k1(logprobs, ref_logprobs), logprobs, ref_logprobs)


@KL_ESTIMATES.register("k3+", loss_gradient="reverse")
def kl_k3_plus(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """verl's `k3+`: k3's value, k2's gradient (verl `kl_penalty`, PR 2953), so ∇KL(π ‖ π_ref) on-policy."""
    return _with_k2_gradient(kl_k3(logprobs, ref_logprobs), logprobs, ref_logprobs)


KL_ESTIMATORS = KL_ESTIMATES.names()


def kl_estimate(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(π ‖ π_ref) by `estimator`, a name in KL_ESTIMATES (k1, k2, k3, k1+, k3+).

    Args:
        logprobs, ref_logprobs: log π and log π_ref of the sampled tokens, any shape (the same).
        estimator: a name in KL_ESTIMATES.
    Returns:
        a tensor of their shape.
    Raises:
        ValueError: an estimator not in KL_ESTIMATES.
    """
    return KL_ESTIMATES.entry(estimator).fn(logprobs, ref_logprobs)


def kl_loss_gradient(estimator: str, use_bias_correction_kl: bool = False) -> str | None:
    """What the KL loss term `kl_loss_term(…, estimator, use_bias_correction_kl)` descends in expectation:
    "reverse" (∇KL(π ‖ π_ref)), "forward" (∇KL(π_ref ‖ π)), "zero", or None (a user's estimator: unknown).
    Raises ValueError for an unknown estimator, or `use_bias_correction_kl` with one that is not `unbiased`
    (its ratio-weighted gradient, ∇E_π[estimate], is then no KL's)."""
    entry = KL_ESTIMATES.entry(estimator)
    if not use_bias_correction_kl:
        return entry.loss_gradient
    if not entry.unbiased:
        raise ValueError(
            f"use_bias_correction_kl weights the KL by ρ = π/π_old, whose gradient is ∇E_π[estimate]: the reverse "
            f"KL's for {KL_ESTIMATES.names(unbiased=True)} only, not kl_estimator={estimator}"
        )
    return "reverse"


def kl_loss_term(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    old_logprobs: torch.Tensor | None = None,
    estimator: str = "k3",
    use_bias_correction_kl: bool = False,
) -> torch.Tensor:
    """The per-token KL to the reference as a loss term (before β): `kl_estimate(…, estimator)`, or with
    `use_bias_correction_kl` (TRL's name; DeepSeek-V3.2, arXiv:2512.02556, section 3.1) that estimate times the
    token's importance ratio ρ = π/π_old, with its gradient: over y ~ π_old, E[∇(ρ·k)] = ∇E_π[k] = ∇KL(π ‖ π_ref)
    for an `unbiased` k (k1, k3), whatever π_old, so also on the later steps of a rollout (num_iterations,
    PPO epochs) or on stale episodes. Per token ∇(ρ·k3) = ρ·(log π − log π_ref)·∇log π, which is OpenRLHF's
    `unbiased_gradient` (its importance weight detached, unclamped) and, at ρ = 1, k2's, k1+'s and k3+'s.
    ρ is always the token's own ratio, whatever GRPO's importance_sampling_level (TRL broadcasts a sequence ratio).

    Args:
        logprobs, ref_logprobs, old_logprobs: log π (with its gradient), log π_ref and log π_old of the sampled
            tokens, any one shape; old_logprobs is needed only with use_bias_correction_kl.
    Returns:
        a tensor of their shape.
    Raises:
        ValueError: an unknown estimator; use_bias_correction_kl with an estimator that is not `unbiased`, or
        without old_logprobs.
    """
    kl = kl_estimate(logprobs, ref_logprobs, estimator)
    if not use_bias_correction_kl:
        return kl
    kl_loss_gradient(estimator, use_bias_correction_kl)  # raises for an estimator the ratio does not correct
    if old_logprobs is None:
        raise ValueError("use_bias_correction_kl needs old_logprobs (log π_old of the sampled tokens)")
    return torch.exp(logprobs - old_logprobs) * kl


def kl_penalty_rewards(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    scores: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float,
    kl_estimator: str = "k1",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards: −kl_coef·KL_t on every response token (KL_t: `kl_estimate` of the sampled
    token, k1 = log π − log π_ref by default), plus the score at the last one (Ziegler et al., 2019;
    Ouyang et al., 2022). logprobs, ref_logprobs, mask [N, R]; scores [N]. Returns (rewards,
    non_score_reward), [N, R]."""
    mask = mask.to(logprobs.dtype)
    non_score_reward = -kl_coef * kl_estimate(logprobs, ref_logprobs, kl_estimator) * mask
    rewards = non_score_reward.clone()
    rows = torch.arange(rewards.shape[0], device=rewards.device)
    rewards[rows, last_index(mask)] += scores
    return rewards, non_score_reward


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0, lam: float = 0.95
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al., 2016) over each response.

    δ_t = r_t + γ·V_{t+1} − V_t (V past the last token is 0), A_t = δ_t + γλ·A_{t+1}; returns
    (advantages, returns = advantages + values), both 0 outside the mask.
    """
    mask = mask.to(values.dtype)
    rewards, values = rewards * mask, values * mask
    advantages = torch.zeros_like(values)
    running = torch.zeros_like(values[:, 0])
    for t in reversed(range(values.shape[1])):
        next_value = values[:, t + 1] if t + 1 < values.shape[1] else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = (delta + gamma * lam * running) * mask[:, t]
        advantages[:, t] = running
    return advantages, (advantages + values) * mask


def adaptive_kl_coef(kl_coef: float, kl: float, target: float, horizon: float, n_steps: float) -> float:
    """The adaptive KL controller of Ziegler et al. (2019, "Fine-Tuning Language Models from Human
    Preferences", section 2.2): the next β from the current β and the KL its rollout measured,

        e = clip(KL / target − 1, −0.2, 0.2),    β ← β · (1 + e · min(n_steps / horizon, 1)).

    The paper (and TRL, OpenRLHF) use n_steps / horizon uncapped, so a rollout of more than 5·horizon
    answers far under target turns β negative, which rewards moving away from the reference. Capping the
    step at one horizon keeps each update within β·[0.8, 1.2]: β stays positive, and within a horizon the
    controller is the paper's.

    Args:
        kl_coef: β used for the rollout (> 0).
        kl: its measured KL(π ‖ π_ref) per answer (summed over tokens, averaged over answers; nats).
        target: the KL to steer to (> 0; Ziegler et al. and TRL: 6).
        horizon: how many answers it takes to correct the error (> 0; TRL, OpenRLHF: 10000).
        n_steps: answers in the rollout (over every process).
    Returns:
        the next β, in [0.8·kl_coef, 1.2·kl_coef].
    Raises:
        ValueError: target or horizon not > 0.
    """
    if not (target > 0 and horizon > 0):
        raise ValueError(f"the adaptive KL controller needs target > 0 and horizon > 0, got {target}, {horizon}")
    error = min(max(kl / target - 1.0, -0.2), 0.2)
    return kl_coef * (1.0 + error * min(n_steps / horizon, 1.0))


def clip_scores(scores: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """Scores [N] clamped to [low, high] (OpenRLHF's `reward_clip_range`): one outlying score of the
    reward model cannot dominate an update; applied before the KL penalty is added."""
    return scores.clamp(min=low, max=high)
