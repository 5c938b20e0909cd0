"""ORPO's odds-ratio term, with log(1 − p) computed stably."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F


class ORPOLossOutput(NamedTuple):
    losses: torch.Tensor  # [B] −λ·log σ(log odds ratio), the term added to the NLL
    log_odds_ratio: torch.Tensor  # [B] detached log σ(log odds ratio)
    log_odds_chosen: torch.Tensor  # [B] detached log odds ratio itself
    chosen_rewards: torch.Tensor  # [B] detached λ·avg log π(y_w|x)
    rejected_rewards: torch.Tensor  # [B] detached λ·avg log π(y_l|x)


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 − eˣ) for x < 0, accurate at both ends (Mächler, 2012).

    Near 0, 1 − eˣ cancels: use log(−expm1(x)). Far below, eˣ underflows harmlessly: log1p(−eˣ).
    Each branch sees only inputs where it is finite (a dummy elsewhere), so the unused branch of
    `where` cannot turn the gradient into NaN; x is capped at −eps because log(1 − e⁰) = −∞.
    """
    x = x.clamp(max=-torch.finfo(x.dtype).eps)
    near = x > -math.log(2)
    dummy = torch.full_like(x, -1.0)
    return torch.where(
        near, torch.log(-torch.expm1(torch.where(near, x, dummy))), torch.log1p(-torch.exp(torch.where(near, dummy, x)))
    )


def orpo_loss(
    policy_chosen_avg_logps: torch.Tensor, policy_rejected_avg_logps: torch.Tensor, beta: float = 0.1
) -> ORPOLossOutput:
    """Odds Ratio Preference Optimization (Hong et al., 2024, arXiv:2403.07691), eq. 6–7.

    With p = exp(avg log π(y|x)) (inputs [B] average per-token log-probs, < 0):
    log odds(y) = log p − log(1 − p);  L_OR = −log σ(log odds(y_w) − log odds(y_l)).
    Returns λ·L_OR per pair (λ is `beta`); the full ORPO loss is NLL(y_w) + mean(losses).
    """
    log_odds = (policy_chosen_avg_logps - log1mexp(policy_chosen_avg_logps)) - (
        policy_rejected_avg_logps - log1mexp(policy_rejected_avg_logps)
    )
    ratio = F.logsigmoid(log_odds)
    return ORPOLossOutput(
        -beta * ratio,
        ratio.detach(),
        log_odds.detach(),
        beta * policy_chosen_avg_logps.detach(),
        beta * policy_rejected_avg_logps.detach(),
    )
