"""The Bradley-Terry loss for training a reward model on preference pairs."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def bradley_terry_loss(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    margin: torch.Tensor | None = None,
    center_rewards_coefficient: float = 0.0,
) -> torch.Tensor:
    """Mean over pairs of −log σ(r_c − r_r − m), plus c · mean((r_c + r_r)²). Inputs [B].

    Bradley & Terry (1952) as used for RLHF reward models (Ouyang et al., 2022); the per-pair
    margin m follows Llama 2 (Touvron et al., 2023); the centring term, which keeps rewards near
    zero, follows Eisenstein et al. (2023). A missing margin is 0.
    """
    diff = chosen_rewards - rejected_rewards
    if margin is not None:
        diff = diff - margin
    loss = -F.logsigmoid(diff).mean()
    if center_rewards_coefficient:
        loss = loss + center_rewards_coefficient * ((chosen_rewards + rejected_rewards) ** 2).mean()
    return loss
