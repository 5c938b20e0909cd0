"""DPO: preference optimisation against a frozen reference, with an optional NLL (RPO) term."""

from __future__ import annotations

import torch
from omegaconf import DictConfig

from alignlab.algorithms.pairwise import PairwiseModule, preference_metrics
from alignlab.losses import DPO_LOSS_TYPES, dpo_loss, nll_loss, step_mean
from alignlab.runner.checks import Checks


class DPO(PairwiseModule):
    """loss = mean(dpo_loss) + rpo_alpha · NLL(y_w), against the frozen starting policy: the mean over the
    optimizer step's pairs, the NLL over its chosen tokens."""

    uses_reference = True

    @classmethod
    def check_config(cls, algorithm: DictConfig) -> None:
        checks = Checks(algorithm, "algorithm").positive("beta").non_negative("rpo_alpha")
        checks.one_of("loss_type", DPO_LOSS_TYPES).within("label_smoothing", 0, 0.5, high_open=True)

    def score_reference(self, batch: dict) -> dict[str, torch.Tensor]:
        chosen, rejected = self.reference.answer_logprobs(batch).split_pairs(self.rows_in(batch))
        return {"ref_chosen_logps": chosen.logps, "ref_rejected_logps": rejected.logps}

    def reference_logps(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Cached per-row values when the batch carries them, else a no-grad reference forward."""
        if "ref_chosen_logps" not in batch:
            batch = {**batch, **self.score_reference(batch)}
        return batch["ref_chosen_logps"], batch["ref_rejected_logps"]

    def compute(self, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        chosen, rejected = self.policy_pairs(batch)
        ref_chosen, ref_rejected = self.reference_logps(batch)
        out = dpo_loss(
            chosen.logps,
            rejected.logps,
            ref_chosen,
            ref_rejected,
            beta=self.beta,
            loss_type=self.loss_type,
            label_smoothing=self.label_smoothing,
        )
        nll = nll_loss(chosen.token_logps, chosen.mask, *self.step_count(batch, "chosen_tokens"))
        loss = step_mean(out.losses, None, *self.step_count(batch, "rows"))
        loss = loss + self.rpo_alpha * nll if self.rpo_alpha > 0 else loss
        metrics = preference_metrics(out.chosen_rewards, out.rejected_rewards, chosen, rejected)
        return loss, {**metrics, "nll_loss": nll.detach()}
