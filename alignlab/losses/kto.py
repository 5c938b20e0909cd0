"""KTO: a prospect-theoretic loss on unpaired desirable / undesirable answers."""

from __future__ import annotations

from typing import NamedTuple

import torch

KTO_LOSS_TYPES = ("kto", "apo_zero_unpaired")


class KTOLossOutput(NamedTuple):
    losses: torch.Tensor  # [B] per-row weighted loss
    rewards: torch.Tensor  # [B] detached β·(log π(y|x) − log π_ref(y|x))


def kto_kl_estimate(policy_kl_logps: torch.Tensor, ref_kl_logps: torch.Tensor) -> torch.Tensor:
    """z₀: the batch mean of log π(y'|x) − log π_ref(y'|x) over mismatched pairs (x, y'), detached.

    Inputs [B] summed log-probs of answers paired with another row's prompt. Not clamped: average
    this across devices first, then clamp at 0 (KTO paper, eq. 7 and its implementation).
    """
    return (policy_kl_logps - ref_kl_logps).detach().mean()


def kto_loss(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    desirable: torch.Tensor,
    kl: torch.Tensor,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
    loss_type: str = "kto",
) -> KTOLossOutput:
    """Kahneman-Tversky Optimization (Ethayarajh et al., 2024, arXiv:2402.01306), eq. 8, and APO-zero's
    unpaired form.

    r = log π(y|x) − log π_ref(y|x), z₀ = max(kl, 0) (detached):
    - kto: desirable (label true) λ_D·(1 − σ(β(r − z₀))), undesirable (label false) λ_U·(1 − σ(β(z₀ − r)))
    - apo_zero_unpaired: desirable λ_D·(1 − σ(βr)), undesirable λ_U·σ(βr) (APO-zero, D'Oosterlinck et al.,
      2024, arXiv:2408.06266, eq. 7, each answer on its own; no reference point, `kl` is not read)
    Inputs [B] (desirable a bool mask, kl a scalar); the batch loss is the mean of `losses`.
    Raises ValueError for an unknown loss_type.
    """
    if loss_type not in KTO_LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {KTO_LOSS_TYPES}, got {loss_type!r}")
    r = policy_logps - ref_logps
    if loss_type == "kto":
        z0 = kl.detach().clamp(min=0)
        good, bad = 1 - torch.sigmoid(beta * (r - z0)), 1 - torch.sigmoid(beta * (z0 - r))
    else:
        good, bad = 1 - torch.sigmoid(beta * r), torch.sigmoid(beta * r)
    losses = torch.where(desirable, desirable_weight * good, undesirable_weight * bad)
    return KTOLossOutput(losses, beta * r.detach())


def kto_weight_advice(
    n_desirable: int, n_undesirable: int, desirable_weight: float, undesirable_weight: float
) -> str | None:
    """Advice when λ_D·n_D / (λ_U·n_U) falls outside [1, 4/3], the range the KTO paper recommends."""
    if n_desirable == 0 or n_undesirable == 0:
        return (
            f"KTO: the training set has {n_desirable} desirable and {n_undesirable} undesirable rows; "
            "KTO needs both kinds"
        )
    ratio = desirable_weight * n_desirable / (undesirable_weight * n_undesirable)
    if 1 <= ratio <= 4 / 3:
        return None
    # The desirable weight that brings the ratio to the middle of the range, undesirable weight fixed.
    suggested = round(7 / 6 * undesirable_weight * n_undesirable / n_desirable, 3)
    return (
        f"KTO: λ_D·n_D / (λ_U·n_U) = {desirable_weight}·{n_desirable} / ({undesirable_weight}·{n_undesirable}) "
        f"= {ratio:.3g}, outside the advised [1, 4/3]; try algorithm.desirable_weight={suggested}"
    )
