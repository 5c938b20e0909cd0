"""Loss functions: pure tensor math, no models, configs or Lightning."""

from alignlab.losses.cpo import (
    CPO_LOSS_TYPES,
    CPO_LOSSES,
    LENGTH_NORMALISED_CPO_LOSS_TYPES,
    CPOScores,
    RewardLossOutput,
    alphapo_reward,
    cpo_loss,
)
from alignlab.losses.dpo import (
    DPO_LOSS_TYPES,
    DPO_LOSSES,
    F_DIVERGENCE_LOSS_TYPES,
    F_DIVERGENCE_TYPES,
    F_DIVERGENCES,
    PAIR_LOSS_TYPES,
    SORTING_LOSS_TYPES,
    DPOLossOutput,
    PairScores,
    dpo_loss,
    f_divergence_scores,
    implicit_rewards,
    length_desensitised_logps,
    wpo_weights,
)
from alignlab.losses.kto import (
    KTO_LOSS_TYPES,
    KTO_LOSSES,
    KTOLossOutput,
    UnpairedScores,
    kto_kl_estimate,
    kto_loss,
    kto_weight_advice,
)
from alignlab.losses.nll import nll_loss
from alignlab.losses.orpo import ORPOLossOutput, log1mexp, orpo_loss
from alignlab.losses.reduction import step_mean
from alignlab.losses.simpo import simpo_loss

__all__ = [
    "CPO_LOSSES",
    "CPO_LOSS_TYPES",
    "DPO_LOSSES",
    "DPO_LOSS_TYPES",
    "F_DIVERGENCES",
    "F_DIVERGENCE_LOSS_TYPES",
    "F_DIVERGENCE_TYPES",
    "KTO_LOSSES",
    "KTO_LOSS_TYPES",
    "LENGTH_NORMALISED_CPO_LOSS_TYPES",
    "PAIR_LOSS_TYPES",
    "SORTING_LOSS_TYPES",
    "CPOScores",
    "DPOLossOutput",
    "KTOLossOutput",
    "ORPOLossOutput",
    "PairScores",
    "RewardLossOutput",
    "UnpairedScores",
    "alphapo_reward",
    "cpo_loss",
    "dpo_loss",
    "f_divergence_scores",
    "implicit_rewards",
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
