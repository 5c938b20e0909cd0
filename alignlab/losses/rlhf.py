"""RLHF math on response-aligned tensors: pure functions, no models or configs.

Shapes: N responses of up to R tokens; `mask` [N, R] is 1 on real response tokens (up to and
including the first stop token: eos or end of turn) and 0 after.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from alignlab.losses.reduction import masked_mean


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


def kl_penalty_rewards(
    logprobs: torch.Tensor, ref_logprobs: torch.Tensor, scores: torch.Tensor, mask: torch.Tensor, kl_coef: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards: −kl_coef·(log π − log π_ref) on every response token, plus the score at
    the last one (Ziegler et al., 2019; Ouyang et al., 2022). Returns (rewards, non_score_reward), [N, R]."""
    mask = mask.to(logprobs.dtype)
    non_score_reward = -kl_coef * (logprobs - ref_logprobs) * mask
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
