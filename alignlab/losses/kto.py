"""KTO: a prospect-theoretic loss on unpaired desirable / undesirable answers."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import NamedTuple

import torch

from alignlab.losses.dpo import implicit_rewards
from alignlab.registry import Registry


class UnpairedScores(NamedTuple):
    """What a KTO loss type reads of B unpaired answers."""

    logratios: torch.Tensor  # [B] r = log π(y|x) − log π_ref(y|x), summed over the answer's tokens
    kl: torch.Tensor  # scalar, the reference point's estimate z₀ before clamping (kto_kl_estimate)
    beta: float  # β


# Each returns ([B] loss if the answer is desirable, [B] loss if it is undesirable), before the weights λ_D, λ_U.
KTO_LOSSES: Registry[Callable[[UnpairedScores], tuple[torch.Tensor, torch.Tensor]]] = Registry(
    "KTO loss type",
    "algorithm.loss_type",
    reference_point=False,  # reads the KL reference point z₀, so the batch's mismatched pairs are scored
)


@KTO_LOSSES.register("kto", reference_point=True)
def kto_losses(s: UnpairedScores) -> tuple[torch.Tensor, torch.Tensor]:
    """1 − σ(β(r − z₀)) and 1 − σ(β(z₀ − r)), z₀ = max(kl, 0) detached: KTO (Ethayarajh et al., 2024,
    arXiv:2402.01306, eq. 8)."""
    z0 = s.kl.detach().clamp(min=0)
    return 1 - torch.sigmoid(s.beta * (s.logratios - z0)), 1 - torch.sigmoid(s.beta * (z0 - s.logratios))


@KTO_LOSSES.register("apo_zero_unpaired")
def apo_zero_unpaired_losses(s: UnpairedScores) -> tuple[torch.Tensor, torch.Tensor]:
    """1 − σ(βr) and σ(βr): APO-zero (D'Oosterlinck et al., 2024, arXiv:2408.06266, eq. 7), each answer on
    its own; no reference point (`kl` is not read)."""
    return 1 - torch.sigmoid(s.beta * s.logratios), torch.sigmoid(s.beta * s.logratios)


KTO_LOSS_TYPES = KTO_LOSSES.names()


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
    loss_type: str | Mapping = "kto",
) -> KTOLossOutput:
    """Kahneman-Tversky Optimization (Ethayarajh et al., 2024, arXiv:2402.01306), eq. 8, and APO-zero's
    unpaired form: the loss type `loss_type` names in KTO_LOSSES (a name in KTO_LOSS_TYPES, a dotted path to
    the user's own function of UnpairedScores, or `{_target_: dotted.path, **kwargs}`), weighted λ_D for
    desirable answers (label true) and λ_U for undesirable ones.

    Inputs [B] (desirable a bool mask, kl a scalar); the batch loss is the mean of `losses`.
    Raises ConfigError for an unknown loss_type.
    """
    r = policy_logps - ref_logps
    good, bad = KTO_LOSSES.resolve(loss_type).fn(UnpairedScores(r, kl, beta))
    losses = torch.where(desirable, desirable_weight * good, undesirable_weight * bad)
    return KTOLossOutput(losses, implicit_rewards(r, beta))


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
