"""Loss functions: pure tensor math, no models, configs or Lightning."""

from alignlab.losses.dpo import DPO_LOSS_TYPES, DPOLossOutput, dpo_loss
from alignlab.losses.nll import nll_loss

__all__ = ["DPO_LOSS_TYPES", "DPOLossOutput", "dpo_loss", "nll_loss"]
