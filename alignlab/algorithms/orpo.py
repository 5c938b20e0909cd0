"""ORPO: NLL on the chosen answer plus an odds-ratio preference term, no reference model."""

from __future__ import annotations

import torch
from omegaconf import DictConfig

from alignlab.algorithms.pairwise import PairwiseModule, preference_metrics
from alignlab.losses import nll_loss, orpo_loss, step_mean
from alignlab.runner.checks import Checks


class ORPO(PairwiseModule):
    """loss = NLL(y_w) − λ·mean(log σ(log odds(y_w) − log odds(y_l))), on average per-token log-probs.

    λ is the config's `beta` (the name TRL uses).
    """

    @classmethod
    def check_config(cls, algorithm: DictConfig) -> None:
        Checks(algorithm, "algorithm").positive("beta")

    def compute(self, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        chosen, rejected = self.policy_pairs(batch)
        out = orpo_loss(chosen.avg_logps, rejected.avg_logps, beta=self.beta)
        nll = nll_loss(chosen.token_logps, chosen.mask, *self.step_count(batch, "chosen_tokens"))
        loss = nll + step_mean(out.losses, None, *self.step_count(batch, "rows"))
        metrics = preference_metrics(out.chosen_rewards, out.rejected_rewards, chosen, rejected)
        metrics.update(
            nll_loss=nll.detach(), log_odds_ratio=out.log_odds_ratio.mean(), log_odds_chosen=out.log_odds_chosen.mean()
        )
        return loss, metrics
