"""Shared by the pairwise preference algorithms (DPO, CPO, ORPO, SimPO): one concatenated forward
over chosen and rejected answers, and the field's pairwise metrics."""

from __future__ import annotations

import torch

from alignlab.algorithms.base import AlignmentModule
from alignlab.models.logprobs import AnswerLogps, answer_logprobs


def preference_metrics(
    chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, chosen: AnswerLogps, rejected: AnswerLogps
) -> dict[str, torch.Tensor]:
    """The field's pairwise metrics (TRL's names) from per-pair rewards and policy log-probs."""
    return {
        "rewards/chosen": chosen_rewards.mean(),
        "rewards/rejected": rejected_rewards.mean(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
        "logps/chosen": chosen.logps.detach().mean(),
        "logps/rejected": rejected.logps.detach().mean(),
        "logits/chosen": chosen.mean_logits.mean(),
        "logits/rejected": rejected.mean_logits.mean(),
    }


class PairwiseModule(AlignmentModule):
    """Base for algorithms trained on (prompt, chosen, rejected) batches."""

    def policy_pairs(self, batch: dict) -> tuple[AnswerLogps, AnswerLogps]:
        """(chosen, rejected) answer log-probs of the policy, from one forward over the 2B sequences."""
        return answer_logprobs(self.model, batch).split_pairs(self.rows_in(batch))
