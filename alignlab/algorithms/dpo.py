"""DPO: preference optimisation against a frozen reference, with an optional NLL (RPO) term."""

from __future__ import annotations

import torch
from omegaconf import DictConfig

from alignlab.algorithms.base import AlignmentModule
from alignlab.errors import ConfigError
from alignlab.logprobs import answer_logprobs
from alignlab.losses import DPO_LOSS_TYPES, dpo_loss, nll_loss
from alignlab.models.reference import ReferenceModel


def preference_metrics(chosen_rewards, rejected_rewards, policy_chosen, policy_rejected) -> dict:
    """The field's pairwise metrics (TRL names) from per-pair rewards and policy log-probs."""
    return {
        "rewards/chosen": chosen_rewards.mean(),
        "rewards/rejected": rejected_rewards.mean(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
        "logps/chosen": policy_chosen.logps.detach().mean(),
        "logps/rejected": policy_rejected.logps.detach().mean(),
        "logits/chosen": policy_chosen.mean_logits.mean(),
        "logits/rejected": policy_rejected.mean_logits.mean(),
    }


class DPO(AlignmentModule):
    def __init__(
        self,
        model,
        tokenizer,
        optim,
        evaluation=None,
        beta: float = 0.1,
        rpo_alpha: float = 1.0,
        loss_type: str = "sigmoid",
        label_smoothing: float = 0.0,
    ):
        super().__init__(
            model,
            tokenizer,
            optim,
            evaluation,
            beta=beta,
            rpo_alpha=rpo_alpha,
            loss_type=loss_type,
            label_smoothing=label_smoothing,
        )
        self.beta, self.rpo_alpha, self.loss_type, self.label_smoothing = beta, rpo_alpha, loss_type, label_smoothing
        self.reference = ReferenceModel(model)

    @classmethod
    def check_config(cls, algorithm: DictConfig) -> None:
        if not algorithm.beta > 0:
            raise ConfigError(f"algorithm.beta must be > 0, got {algorithm.beta}")
        if algorithm.rpo_alpha < 0:
            raise ConfigError(f"algorithm.rpo_alpha must be >= 0, got {algorithm.rpo_alpha}")
        if algorithm.loss_type not in DPO_LOSS_TYPES:
            raise ConfigError(f"algorithm.loss_type must be one of {DPO_LOSS_TYPES}, got {algorithm.loss_type!r}")
        if not 0 <= algorithm.label_smoothing < 0.5:
            raise ConfigError(f"algorithm.label_smoothing must be in [0, 0.5), got {algorithm.label_smoothing}")

    def on_fit_start(self) -> None:
        self.reference.to(self.device)

    def on_validation_start(self) -> None:
        self.reference.to(self.device)

    def reference_logps(self, batch: dict, n_pairs: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Cached per-row values when the batch carries them, else a no-grad reference forward."""
        if "ref_chosen_logps" in batch:
            return batch["ref_chosen_logps"], batch["ref_rejected_logps"]
        ref = self.reference.answer_logprobs(batch)
        return ref.logps[:n_pairs], ref.logps[n_pairs:]

    def compute(self, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        n_pairs = self.rows_in(batch)
        chosen, rejected = answer_logprobs(self.model, batch).split_pairs(n_pairs)
        ref_chosen, ref_rejected = self.reference_logps(batch, n_pairs)
        out = dpo_loss(
            chosen.logps,
            rejected.logps,
            ref_chosen,
            ref_rejected,
            beta=self.beta,
            loss_type=self.loss_type,
            label_smoothing=self.label_smoothing,
        )
        loss = out.losses.mean()
        nll = nll_loss(chosen.token_logps, chosen.mask)
        if self.rpo_alpha > 0:
            loss = loss + self.rpo_alpha * nll
        metrics = preference_metrics(out.chosen_rewards, out.rejected_rewards, chosen, rejected)
        metrics["nll_loss"] = nll.detach()
        return loss, metrics
