"""Loss functions: pure tensor math, no models, configs or Lightning."""

from alignlab.losses.cpo import (
    CPO_LOSS_TYPES,
    LENGTH_NORMALISED_CPO_LOSS_TYPES,
    RewardLossOutput,
    alphapo_reward,
    cpo_loss,
)
from alignlab.losses.dpo import (
    DPO_LOSS_TYPES,
    F_DIVERGENCE_LOSS_TYPES,
    F_DIVERGENCE_TYPES,
    LENGTH_LOSS_TYPES,
    PAIR_LOSS_TYPES,
    SORTING_LOSS_TYPES,
    DPOLossOutput,
    dpo_loss,
    f_divergence_scores,
    length_desensitised_logps,
    wpo_weights,
)
from alignlab.losses.kto import KTO_LOSS_TYPES, KTOLossOutput, kto_kl_estimate, kto_loss, kto_weight_advice
from alignlab.losses.nll import nll_loss
from alignlab.losses.orpo import ORPOLossOutput, log1mexp, orpo_loss
from alignlab.losses.reduction import step_mean
from alignlab.losses.simpo import simpo_loss

__all__ = [
    "CPO_LOSS_TYPES",
    "DPO_LOSS_TYPES",
    "F_DIVERGENCE_LOSS_TYPES",
    "F_DIVERGENCE_TYPES",
    "KTO_LOSS_TYPES",
    "LENGTH_LOSS_TYPES",
    "LENGTH_NORMALISED_CPO_LOSS_TYPES",
    "PAIR_LOSS_TYPES",
    "SORTING_LOSS_TYPES",
    "DPOLossOutput",
    "KTOLossOutput",
    "ORPOLossOutput",
    "RewardLossOutput",
    "alphapo_reward",
    "cpo_loss",
    "dpo_loss",
    "f_divergence_scores",
    "kto_kl_estimate",
    "kto_loss",
    "kto_weight_advice",
    "length_desensitised_logps",
    "log1mexp",
    "nll_loss",
    "orpo_loss",
    "simpo_loss",
    "step_mean",
    "wpo_weights",
]
