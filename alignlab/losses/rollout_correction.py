"""The rollout engine's log-probs against the trainer's: importance weights, off-policy masks, the mismatch.

An inference engine (vLLM) samples with its own kernels and precision, so the distribution it sampled
from, π_sampler, is not exactly the trainer's π_train even at the same weights; an asynchronous pipeline
adds staleness (the sampler is some versions behind). Each token's policy-gradient term is then weighted
by an importance ratio ρ = π_train/π_sampler kept inside [C_min, C_max]. TRL names the variants by
`vllm_importance_sampling_mode`, along two axes:

- granularity: `token_*` one ratio per token; `sequence_*` one per completion, exp(Σ_t log ρ_t) over its
  tokens (the whole answer's probability ratio, the unbiased one of Liu, Li et al. 2025, "When Speed Kills
  Stability"), applied to each of its tokens;
- constraint: `*_truncate` clips ρ into [C_min, C_max] (TIS: Yao et al., 2025, "Your Efficient RL Framework
  Secretly Brings You Off-Policy RL Training", upper bound only; TRL adds the lower one); `*_mask` sets ρ to 0
  outside it, so those tokens or answers give no gradient (MIS / IcePop: Ling Team, 2025, "Every Step
  Evolves", arXiv:2510.18855).

Each mode is one function in ROLLOUT_CORRECTIONS, fn(train_logprobs, sampling_logprobs, mask, cap,
clip_min=None) -> weights [N, R]; its properties say which granularity (`level`: "token" or "sequence") and
whether it can set a weight to 0 (`masks`), which the metrics read. Beside them: DeepSeek-V3.2's off-policy
sequence mask (`off_policy_sequence_mask`) and AReaL's decoupled objective (`decoupled_policy_loss`), which
an asynchronous pipeline calls.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from alignlab.registry import Registry

ROLLOUT_CORRECTIONS: Registry[Callable[..., torch.Tensor]] = Registry(
    "rollout correction mode", "algorithm.vllm_importance_sampling_mode", level="token", masks=False
)


def _log_ratio(train_logprobs: torch.Tensor, sampling_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[N, R] log π_train − log π_sampler on `mask`'s tokens, 0 elsewhere (whatever the log-probs there)."""
    delta = train_logprobs - sampling_logprobs
    return torch.where(mask > 0, delta, torch.zeros_like(delta))


def _sequence_ratio(train_logprobs: torch.Tensor, sampling_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[N, 1] π_train(y)/π_sampler(y) of each whole completion: exp of the summed log-ratio over its tokens."""
    return torch.exp(_log_ratio(train_logprobs, sampling_logprobs, mask).sum(1, keepdim=True))


def _inside(ratio: torch.Tensor, clip_min: float | None, cap: float | None) -> torch.Tensor:
    """Where C_min <= ratio <= C_max (a bound that is None does not bind)."""
    keep = torch.ones_like(ratio, dtype=torch.bool)
    if clip_min is not None:
        keep = keep & (ratio >= clip_min)
    if cap is not None:
        keep = keep & (ratio <= cap)
    return keep


@ROLLOUT_CORRECTIONS.register("token_truncate")
def truncated_importance_weights(
    train_logprobs: torch.Tensor,
    sampling_logprobs: torch.Tensor,
    mask: torch.Tensor,
    cap: float | None,
    clip_min: float | None = None,
) -> torch.Tensor:
    """w_t = clip(exp(log π_train(y_t) − log π_sampler(y_t)), C_min, C_max) on each completion token (Yao et
    al., 2025, truncated importance sampling: min(ρ_t, C); `clip_min` as TRL), 1 where `mask` is 0 (no
    correction past an answer's end).

    train_logprobs, sampling_logprobs, mask [N, R]: the trainer's log-probs of the sampled tokens at
    rollout time (no gradient: the weight is a constant of the loss), the engine's of the same tokens at
    the same temperature, 1 on each completion's tokens. cap: C_max > 0; clip_min: C_min (None: 0). At
    least one bound is set. Returns [N, R] in the inputs' dtype.
    """
    ratio = torch.exp(train_logprobs - sampling_logprobs).clamp(min=clip_min, max=cap)
    return torch.where(mask > 0, ratio, torch.ones_like(ratio))


@ROLLOUT_CORRECTIONS.register("token_mask", masks=True)
def masked_importance_weights(
    train_logprobs: torch.Tensor,
    sampling_logprobs: torch.Tensor,
    mask: torch.Tensor,
    cap: float | None,
    clip_min: float | None = None,
) -> torch.Tensor:
    """w_t = ρ_t·1[C_min <= ρ_t <= C_max], ρ_t = π_train(y_t)/π_sampler(y_t) (MIS / IcePop, arXiv:2510.18855,
    per token; TRL's token_mask): a token outside the bounds gives no gradient; 1 where `mask` is 0. Shapes
    and bounds as truncated_importance_weights (None: that bound does not bind)."""
    ratio = torch.exp(_log_ratio(train_logprobs, sampling_logprobs, mask))
    ratio = torch.where(_inside(ratio, clip_min, cap), ratio, torch.zeros_like(ratio))
    return torch.where(mask > 0, ratio, torch.ones_like(ratio))


@ROLLOUT_CORRECTIONS.register("sequence_truncate", level="sequence")
def sequence_truncated_importance_weights(
    train_logprobs: torch.Tensor,
    sampling_logprobs: torch.Tensor,
    mask: torch.Tensor,
    cap: float | None,
    clip_min: float | None = None,
) -> torch.Tensor:
    """w_i = clip(π_train(y_i)/π_sampler(y_i), C_min, C_max), the ratio of completion i's whole probability
    (exp Σ_t over `mask`'s tokens of the log-ratio; TRL's sequence_truncate), on every position of row i
    ([N, R]; a row without tokens: clip(1)). Shapes and bounds as truncated_importance_weights."""
    ratio = _sequence_ratio(train_logprobs, sampling_logprobs, mask).clamp(min=clip_min, max=cap)
    return ratio.expand_as(train_logprobs).clone()


@ROLLOUT_CORRECTIONS.register("sequence_mask", level="sequence", masks=True)
def sequence_masked_importance_weights(
    train_logprobs: torch.Tensor,
    sampling_logprobs: torch.Tensor,
    mask: torch.Tensor,
    cap: float | None,
    clip_min: float | None = None,
) -> torch.Tensor:
    """w_i = ρ_i·1[C_min <= ρ_i <= C_max], ρ_i = π_train(y_i)/π_sampler(y_i) of completion i's whole
    probability (MIS / IcePop per sequence; TRL's sequence_mask, its default): an answer outside the bounds
    gives no gradient at all. On every position of row i ([N, R]); shapes and bounds as token_mask."""
    ratio = _sequence_ratio(train_logprobs, sampling_logprobs, mask)
    ratio = torch.where(_inside(ratio, clip_min, cap), ratio, torch.zeros_like(ratio))
    return ratio.expand_as(train_logprobs).clone()


def off_policy_sequence_mask(
    advantages: torch.Tensor,
    logprobs: torch.Tensor,
    sampling_logprobs: torch.Tensor,
    mask: torch.Tensor,
    threshold: float,
) -> torch.Tensor:
    """[N, 1] DeepSeek-V3.2's off-policy sequence mask (DeepSeek-AI, 2025, arXiv:2512.02556, eq. 9; TRL's
    `off_policy_mask_threshold` δ): 0 for a completion with a negative advantage whose mean log-ratio
    (1/|y|)·Σ_t (log π_sampler(y_t) − log π(y_t)) over `mask`'s tokens (a KL(π_sampler‖π) estimate) exceeds
    δ, else 1. It drops the answers the policy has drifted from and that would push it further down.

    advantages [N] (one per completion) or [N, 1]; logprobs [N, R] the current policy's (read without
    gradient); sampling_logprobs [N, R] the behaviour policy's (the engine's, or π_old without one); mask
    [N, R]. Returns [N, 1] in `logprobs`' dtype.
    """
    drift = _log_ratio(sampling_logprobs, logprobs.detach(), mask).sum(1, keepdim=True)
    mean_drift = drift / mask.sum(1, keepdim=True).clamp(min=1.0)
    a = advantages.reshape(-1, 1)
    return ((a >= 0) | (mean_drift <= threshold)).to(logprobs.dtype)


def decoupled_policy_loss(
    logprobs: torch.Tensor,
    proximal_logprobs: torch.Tensor,
    behaviour_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    epsilon: float = 0.2,
    epsilon_high: float | None = None,
    behaviour_weight_cap: float | None = None,
) -> torch.Tensor:
    """AReaL's decoupled PPO objective (Fu et al., 2025, arXiv:2505.24298), per token [N, R]:
    loss_t = −w_t·min(ρ_t·A_t, clip(ρ_t, 1−ε, 1+ε_high)·A_t), ρ_t = π(y_t)/π_prox(y_t) (the trust region
    around the proximal policy, the trainer's π_old) and w_t = π_prox(y_t)/π_behav(y_t) (the behaviour policy
    that sampled y, a stale version; no gradient), 0 where w_t > `behaviour_weight_cap` (AReaL's
    `behav_imp_weight_cap` masks, it does not truncate) and off `mask`. With π_prox = π_behav it is PPO's
    clipped objective.

    logprobs [N, R] (with gradient), proximal_logprobs, behaviour_logprobs, mask [N, R]; advantages [N, R]
    or [N] (one per completion). Returns [N, R]; reduce it as the loss's aggregation does.
    """
    a = advantages if advantages.dim() == logprobs.dim() else advantages.unsqueeze(1)
    ratio = torch.exp(logprobs - proximal_logprobs.detach())
    high = epsilon if epsilon_high is None else epsilon_high
    objective = torch.min(ratio * a, ratio.clamp(1 - epsilon, 1 + high) * a)
    weight = torch.exp(_log_ratio(proximal_logprobs, behaviour_logprobs, mask)).detach()
    if behaviour_weight_cap is not None:
        weight = torch.where(weight <= behaviour_weight_cap, weight, torch.zeros_like(weight))
    return torch.where(mask > 0, -weight * objective, torch.zeros_like(objective))


def logprob_mismatch(
    train_logprobs: torch.Tensor, sampling_logprobs: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, max) over the completion tokens (`mask` [N, R] 1) of |log π_train(y_t) − log π_sampler(y_t)|,
    scalars; both 0 without tokens. TRL logs them as sampling/sampling_logp_difference/{mean,max}."""
    delta = (train_logprobs - sampling_logprobs).abs()[mask > 0]
    if delta.numel() == 0:
        zero = torch.zeros((), dtype=train_logprobs.dtype, device=train_logprobs.device)
        return zero, zero
    return delta.mean(), delta.max()
