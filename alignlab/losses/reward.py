"""The Bradley-Terry loss for training a reward model on preference pairs."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from alignlab.losses.reduction import step_mean


def bradley_terry_loss(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    margin: torch.Tensor | None = None,
    center_rewards_coefficient: float = 0.0,
    num_items_in_batch: float | torch.Tensor | None = None,
    scale: float = 1.0,
) -> torch.Tensor:
    """Mean over pairs of −log σ(r_c − r_r − m), plus c · mean((r_c + r_r)²). Inputs [B].

    Both means run over the optimizer step's `num_items_in_batch` pairs (None: this batch's B), see
    alignlab.losses.reduction.step_mean for `scale`.

    Bradley & Terry (1952) as used for RLHF reward models (Ouyang et al., 2022); the per-pair
    margin m follows Llama 2 (Touvron et al., 2023); the centring term, which keeps rewards near
    zero, follows Eisenstein et al. (2023). A missing margin is 0.
    """
    diff = chosen_rewards - rejected_rewards
    if margin is not None:
        diff = diff - margin
    per_pair = -F.logsigmoid(diff)
    if center_rewards_coefficient:
        per_pair = per_pair + center_rewards_coefficient * (chosen_rewards + rejected_rewards) ** 2
    return step_mean(per_pair, None, num_items_in_batch, scale)
