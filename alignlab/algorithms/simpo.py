"""SimPO: length-normalised, reference-free preference optimisation with a target margin γ."""

from __future__ import annotations

import torch
from omegaconf import DictConfig

from alignlab.algorithms.pairwise import PairwiseModule, preference_metrics
from alignlab.losses import nll_loss, simpo_loss, step_mean
from alignlab.runner.checks import Checks


class SimPO(PairwiseModule):
    """loss = mean(−log σ(β·(avg log π(y_w) − avg log π(y_l)) − γ)) + cpo_alpha · NLL(y_w).

    cpo_alpha = 0 is the original SimPO; > 0 adds CPO's NLL term (CPO-SimPO). No reference model.
    """

    @classmethod
    def check_config(cls, algorithm: DictConfig) -> None:
        Checks(algorithm, "algorithm").positive("beta").non_negative("simpo_gamma", "cpo_alpha")

    def compute(self, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        chosen, rejected = self.policy_pairs(batch)
        out = simpo_loss(chosen.avg_logps, rejected.avg_logps, beta=self.beta, gamma=self.simpo_gamma)
        nll = nll_loss(chosen.token_logps, chosen.mask, *self.step_count(batch, "chosen_tokens"))
        loss = step_mean(out.losses, None, *self.step_count(batch, "rows"))
        loss = loss + self.cpo_alpha * nll if self.cpo_alpha > 0 else loss
        metrics = preference_metrics(out.chosen_rewards, out.rejected_rewards, chosen, rejected)
        return loss, {**metrics, "nll_loss": nll.detach()}
