"""CPO's preference term: DPO's sigmoid loss with no reference model."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F


class RewardLossOutput(NamedTuple):
    losses: torch.Tensor  # [B] per-pair preference loss
    chosen_rewards: torch.Tensor  # [B] detached implicit reward of the chosen answer
    rejected_rewards: torch.Tensor  # [B] detached implicit reward of the rejected answer


def cpo_loss(
    policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor, beta: float = 0.1
) -> RewardLossOutput:
    """Contrastive Preference Optimization (Xu et al., 2024, arXiv:2401.08417), preference term.

    losses = −log σ(β·(log π(y_w|x) − log π(y_l|x)));  inputs [B] summed answer log-probs.
    Rewards are β·log π(y|x). The NLL term (weight cpo_alpha) is added by the caller.
    """
    losses = -F.logsigmoid(beta * (policy_chosen_logps - policy_rejected_logps))
    return RewardLossOutput(losses, beta * policy_chosen_logps.detach(), beta * policy_rejected_logps.detach())
