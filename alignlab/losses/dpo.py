"""DPO loss and its variants, as pure functions of summed answer log-probs."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

DPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "robust")


class DPOLossOutput(NamedTuple):
    losses: torch.Tensor  # [B] per-pair loss
    chosen_rewards: torch.Tensor  # [B] β·(log π(y_w|x) − log π_ref(y_w|x)), detached
    rejected_rewards: torch.Tensor  # [B] β·(log π(y_l|x) − log π_ref(y_l|x)), detached


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> DPOLossOutput:
    """Direct Preference Optimization (Rafailov et al., 2023, arXiv:2305.18290) and variants.

    All inputs are [B] summed answer log-probs. With h = (π_w − ref_w) − (π_l − ref_l):
    - sigmoid: −(1−ε)·log σ(βh) − ε·log σ(−βh)          (ε = label_smoothing; ε=0 is DPO, ε>0 cDPO)
    - hinge:   max(0, 1 − βh)                             (SLiC, Zhao et al., 2023)
    - ipo:     (h − 1/(2β))²                              (IPO, Azar et al., 2023, arXiv:2310.12036)
    - robust:  [(1−ε)·(−log σ(βh)) − ε·(−log σ(−βh))] / (1 − 2ε)   (rDPO, Chowdhury et al., 2024)
    """
    h = (policy_chosen_logps - ref_chosen_logps) - (policy_rejected_logps - ref_rejected_logps)
    if loss_type == "sigmoid":
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * h)
    elif loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    elif loss_type == "robust":
        losses = ((1 - label_smoothing) * -F.logsigmoid(beta * h) - label_smoothing * -F.logsigmoid(-beta * h)) / (
            1 - 2 * label_smoothing
        )
    else:
        raise ValueError(f"loss_type must be one of {DPO_LOSS_TYPES}, got {loss_type!r}")
    chosen_rewards = beta * (policy_chosen_logps - ref_chosen_logps).detach()
    rejected_rewards = beta * (policy_rejected_logps - ref_rejected_logps).detach()
    return DPOLossOutput(losses, chosen_rewards, rejected_rewards)
