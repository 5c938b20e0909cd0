"""SimPO: a length-normalised, reference-free preference loss with a target margin."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from alignlab.losses.cpo import RewardLossOutput


def simpo_loss(
    policy_chosen_avg_logps: torch.Tensor,
    policy_rejected_avg_logps: torch.Tensor,
    beta: float = 2.0,
    gamma: float = 1.0,
) -> RewardLossOutput:
    """Simple Preference Optimization (Meng et al., 2024, arXiv:2405.14734), eq. 6.

    losses = −log σ(β·avg log π(y_w|x) − β·avg log π(y_l|x) − γ), where avg log π(y|x) is the
    answer's summed log-prob divided by its token count; inputs [B]. Rewards are β·avg log π(y|x).
    """
    chosen_rewards, rejected_rewards = beta * policy_chosen_avg_logps, beta * policy_rejected_avg_logps
    losses = -F.logsigmoid(chosen_rewards - rejected_rewards - gamma)
    return RewardLossOutput(losses, chosen_rewards.detach(), rejected_rewards.detach())
