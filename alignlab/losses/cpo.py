"""CPO's preference term: DPO's losses with no reference model, and AlphaPO's reward shape."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import NamedTuple

import torch
import torch.nn.functional as F

from alignlab.registry import Registry


class CPOScores(NamedTuple):
    """What a CPO loss type reads of B pairs."""

    d: torch.Tensor  # [B] r(y_w) − r(y_l), r = alphapo_reward(log π(y|x), alpha) (log π when alpha = 0)
    beta: float  # β
    simpo_gamma: float  # γ, AlphaPO's (SimPO's) target margin


CPO_LOSSES: Registry[Callable[[CPOScores], torch.Tensor]] = Registry(
    "CPO loss type",
    "algorithm.loss_type",
    length_normalised=False,  # reads length-normalised log-probs (TRL's average_log_prob); else summed ones
    without_nll=False,  # trained without CPO's NLL term, as its paper and TRL train it: cpo_alpha must be 0
)


@CPO_LOSSES.register("sigmoid")
def cpo_sigmoid_loss(s: CPOScores) -> torch.Tensor:
    """−log σ(βd): CPO (Xu et al., 2024, arXiv:2401.08417, eq. 3)."""
    return -F.logsigmoid(s.beta * s.d)


@CPO_LOSSES.register("hinge")
def cpo_hinge_loss(s: CPOScores) -> torch.Tensor:
    """max(0, 1 − βd): SLiC (Zhao et al., 2023, arXiv:2305.10425)."""
    return torch.relu(1 - s.beta * s.d)


@CPO_LOSSES.register("ipo", length_normalised=True)
def cpo_ipo_loss(s: CPOScores) -> torch.Tensor:
    """(d − 1/(2β))²: IPO (Azar et al., 2023, arXiv:2310.12036, eq. 17), on length-normalised log-probs as
    TRL feeds it."""
    return (s.d - 1 / (2 * s.beta)) ** 2


@CPO_LOSSES.register("alphapo", length_normalised=True, without_nll=True)
def alphapo_loss(s: CPOScores) -> torch.Tensor:
    """−log σ(βd − γ): AlphaPO (Gupta et al., 2025, arXiv:2501.03884), SimPO's margin on length-normalised
    log-probs, with AlphaPO's reward shape in d."""
    return -F.logsigmoid(s.beta * s.d - s.simpo_gamma)


CPO_LOSS_TYPES = CPO_LOSSES.names()
LENGTH_NORMALISED_CPO_LOSS_TYPES = CPO_LOSSES.names(length_normalised=True)


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
    loss_type: str | Mapping = "sigmoid",
    alpha: float = 0.0,
    simpo_gamma: float = 0.5,
) -> RewardLossOutput:
    """Contrastive Preference Optimization (Xu et al., 2024, arXiv:2401.08417), preference term, with
    TRL 1.16's CPOTrainer loss types: the one `loss_type` names in CPO_LOSSES (a name in CPO_LOSS_TYPES, a
    dotted path to the user's own function of CPOScores, or `{_target_: dotted.path, **kwargs}`), of
    d = r(y_w) − r(y_l), r(y) = alphapo_reward(log π(y|x), alpha) (r = log π when alpha = 0).

    Inputs [B]: summed answer log-probs, or length-normalised ones for the loss types with
    `length_normalised` (LENGTH_NORMALISED_CPO_LOSS_TYPES; the caller divides). Rewards are β·r(y). The NLL
    term (weight cpo_alpha) is added by the caller. Raises ConfigError for an unknown loss_type.
    """
    entry = CPO_LOSSES.resolve(loss_type)
    chosen, rejected = alphapo_reward(policy_chosen_logps, alpha), alphapo_reward(policy_rejected_logps, alpha)
    if alpha == 0.0:
        d = chosen - rejected
    else:
        # (p_l^(−α) − p_w^(−α))/α as p_l^(−α)·(1 − (p_w/p_l)^(−α))/α: the two powers are large and close, and
        # subtracting them loses the digits that the exact difference of log-probs keeps.
        logp_gap = policy_chosen_logps - policy_rejected_logps
        d = -torch.exp(-alpha * policy_rejected_logps) * torch.expm1(-alpha * logp_gap) / alpha
    losses = entry.fn(CPOScores(d, beta, simpo_gamma))
    return RewardLossOutput(losses, beta * chosen.detach(), beta * rejected.detach())
