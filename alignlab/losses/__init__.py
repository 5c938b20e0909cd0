"""Loss functions: pure tensor math, no models, configs or Lightning."""

from alignlab.losses.cpo import RewardLossOutput, cpo_loss
from alignlab.losses.dpo import DPO_LOSS_TYPES, DPOLossOutput, dpo_loss
from alignlab.losses.kto import KTOLossOutput, kto_kl_estimate, kto_loss, kto_weight_advice
from alignlab.losses.nll import nll_loss
from alignlab.losses.orpo import ORPOLossOutput, log1mexp, orpo_loss
from alignlab.losses.reduction import step_mean
from alignlab.losses.simpo import simpo_loss

__all__ = [
    "DPO_LOSS_TYPES",
    "DPOLossOutput",
    "KTOLossOutput",
    "ORPOLossOutput",
    "RewardLossOutput",
    "cpo_loss",
    "dpo_loss",
    "kto_kl_estimate",
    "kto_loss",
    "kto_weight_advice",
    "log1mexp",
    "nll_loss",
    "orpo_loss",
    "simpo_loss",
    "step_mean",
]
