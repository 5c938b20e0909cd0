"""CPO: a reference-free sigmoid preference loss plus NLL on the chosen answer."""

from __future__ import annotations

import torch
from omegaconf import DictConfig

from alignlab.algorithms.pairwise import PairwiseModule, preference_metrics
from alignlab.errors import ConfigError
from alignlab.losses import CPO_LOSSES, cpo_loss, nll_loss, step_mean
from alignlab.runner.checks import Checks


class CPO(PairwiseModule):
    """loss = mean(cpo_loss) + cpo_alpha · NLL(y_w); by default −log σ(β·(log π(y_w) − log π(y_l))). No
    reference model."""

    @classmethod
    def check_config(cls, algorithm: DictConfig) -> None:
        Checks(algorithm, "algorithm").positive("beta").non_negative("cpo_alpha", "simpo_gamma")
        entry = CPO_LOSSES.resolve(algorithm.loss_type)
        alpha = algorithm.alpha
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
            raise ConfigError(f"algorithm.alpha must be a number (0: no AlphaPO reward shaping), got {alpha!r}")
        if entry.without_nll and algorithm.cpo_alpha != 0:
            raise ConfigError(
                f"algorithm.loss_type={entry.name} trains as its paper (and TRL) trains it, without CPO's NLL "
                "term: set algorithm.cpo_alpha=0"
            )

    def compute(self, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        chosen, rejected = self.policy_pairs(batch)
        normalised = CPO_LOSSES.resolve(self.loss_type).length_normalised  # TRL's average_log_prob
        policy_chosen, policy_rejected = (
            (chosen.avg_logps, rejected.avg_logps) if normalised else (chosen.logps, rejected.logps)
        )
        out = cpo_loss(
            policy_chosen, policy_rejected, self.beta, self.loss_type, alpha=self.alpha, simpo_gamma=self.simpo_gamma
        )
        nll = nll_loss(chosen.token_logps, chosen.mask, *self.step_count(batch, "chosen_tokens"))
        loss = step_mean(out.losses, None, *self.step_count(batch, "rows")) + self.cpo_alpha * nll
        metrics = preference_metrics(out.chosen_rewards, out.rejected_rewards, chosen, rejected)
        return loss, {**metrics, "nll_loss": nll.detach()}
