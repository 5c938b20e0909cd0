"""CPO: a reference-free sigmoid preference loss plus NLL on the chosen answer."""

from __future__ import annotations

import torch
from omegaconf import DictConfig

from alignlab.algorithms.pairwise import PairwiseModule, preference_metrics
from alignlab.losses import cpo_loss, nll_loss, step_mean
from alignlab.runner.checks import Checks


class CPO(PairwiseModule):
    """loss = mean(−log σ(β·(log π(y_w) − log π(y_l)))) + cpo_alpha · NLL(y_w). No reference model."""

    @classmethod
    def check_config(cls, algorithm: DictConfig) -> None:
        Checks(algorithm, "algorithm").positive("beta").non_negative("cpo_alpha")

    def compute(self, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        chosen, rejected = self.policy_pairs(batch)
        out = cpo_loss(chosen.logps, rejected.logps, beta=self.beta)
        nll = nll_loss(chosen.token_logps, chosen.mask, *self.step_count(batch, "chosen_tokens"))
        loss = step_mean(out.losses, None, *self.step_count(batch, "rows")) + self.cpo_alpha * nll
        metrics = preference_metrics(out.chosen_rewards, out.rejected_rewards, chosen, rejected)
        return loss, {**metrics, "nll_loss": nll.detach()}
