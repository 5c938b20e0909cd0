"""CPO's preference term: DPO's losses with no reference model, and AlphaPO's reward shape."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

# `ipo` and `alphapo` read length-normalised log-probs (TRL's average_log_prob), the others summed ones.
CPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "alphapo")
LENGTH_NORMALISED_CPO_LOSS_TYPES = ("ipo", "alphapo")


class RewardLossOutput(NamedTuple):
    losses: torch.Tensor  # [B] per-pair preference loss
    chosen_rewards: torch.Tensor  # [B] detached implicit reward of the chosen answer
    rejected_rewards: torch.Tensor  # [B] detached implicit reward of the rejected answer


def alphapo_reward(logps: torch.Tensor, alpha: float) -> torch.Tensor:
    """AlphaPO's reward (Gupta et al., 2025, arXiv:2501.03884, eq. 6): (1 − p^(−α))/α with p = exp(logps);
    log p (its limit) when α = 0. `logps` [B]; for AlphaPO itself the length-normalised log-prob."""
    if alpha == 0.0:
        return logps
    return (1 - torch.exp(-alpha * logps)) / alpha


def cpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    alpha: float = 0.0,
    simpo_gamma: float = 0.5,
) -> RewardLossOutput:
    """Contrastive Preference Optimization (Xu et al., 2024, arXiv:2401.08417), preference term, with
    TRL 1.16's CPOTrainer loss types.

    With r(y) = alphapo_reward(log π(y|x), alpha) (r = log π when alpha = 0) and d = r(y_w) − r(y_l):
    - sigmoid: −log σ(βd)                       (CPO, eq. 3)
    - hinge:   max(0, 1 − βd)                    (SLiC)
    - ipo:     (d − 1/(2β))²                     (IPO; on length-normalised log-probs, as TRL feeds it)
    - alphapo: −log σ(βd − γ), γ = simpo_gamma   (AlphaPO: SimPO's margin on length-normalised log-probs)
    Inputs [B]: summed answer log-probs for sigmoid and hinge, length-normalised ones for ipo and
    alphapo (LENGTH_NORMALISED_CPO_LOSS_TYPES; the caller divides). Rewards are β·r(y). The NLL term
    (weight cpo_alpha) is added by the caller. Raises ValueError for an unknown loss_type.
    """
    if loss_type not in CPO_LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {CPO_LOSS_TYPES}, got {loss_type!r}")
    chosen, rejected = alphapo_reward(policy_chosen_logps, alpha), alphapo_reward(policy_rejected_logps, alpha)
    if alpha == 0.0:
        d = chosen - rejected
    else:
        # (p_l^(−α) − p_w^(−α))/α as p_l^(−α)·(1 − (p_w/p_l)^(−α))/α: the two powers are large and close, and
        # subtracting them loses the digits that the exact difference of log-probs keeps.
        logp_gap = policy_chosen_logps - policy_rejected_logps
        d = -torch.exp(-alpha * policy_rejected_logps) * torch.expm1(-alpha * logp_gap) / alpha
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * d)
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * d)
    elif loss_type == "ipo":
        losses = (d - 1 / (2 * beta)) ** 2
    else:
        losses = -F.logsigmoid(beta * d - simpo_gamma)
    return RewardLossOutput(losses, beta * chosen.detach(), beta * rejected.detach())
