"""KTO: unpaired desirable / undesirable answers against a frozen reference and a KL reference point."""

from __future__ import annotations

import logging

import lightning as L
import torch
from omegaconf import DictConfig

from alignlab.algorithms.base import AlignmentModule
from alignlab.data.collate import select_rows
from alignlab.losses import kto_kl_estimate, kto_loss, kto_weight_advice, step_mean
from alignlab.models.logprobs import answer_logprobs
from alignlab.runner.checks import Checks

log = logging.getLogger(__name__)


class WeightAdvice(L.Callback):
    """At fit start, a warning when λ_D·n_D / (λ_U·n_U) over the training rows is outside the paper's
    [1, 4/3] (alignlab.losses.kto_weight_advice), with the weights that bring it back."""

    def on_fit_start(self, trainer: L.Trainer, pl_module: KTO) -> None:
        desirable, undesirable = trainer.datamodule.label_counts("train")
        advice = kto_weight_advice(desirable, undesirable, pl_module.desirable_weight, pl_module.undesirable_weight)
        if advice and trainer.is_global_zero:
            log.warning(advice)


class KTO(AlignmentModule):
    """Batches hold B matched (prompt, answer) rows, then B mismatched ones (prompt i with another
    row's answer) whose policy/reference log-ratio estimates the reference point z₀."""

    uses_reference = True

    @classmethod
    def check_config(cls, algorithm: DictConfig) -> None:
        Checks(algorithm, "algorithm").positive("beta").non_negative("desirable_weight", "undesirable_weight")

    def configure_callbacks(self) -> list[L.Callback]:
        return [*super().configure_callbacks(), WeightAdvice()]

    def score_reference(self, batch: dict) -> dict[str, torch.Tensor]:
        n, ref = self.rows_in(batch), self.reference.answer_logprobs(batch)
        return {"ref_logps": ref.logps[:n], "ref_kl_logps": ref.logps[n:]}

    def reference_logps(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Cached per-row values (matched, mismatched) when the batch carries them, else a reference forward."""
        if "ref_logps" not in batch:
            batch = {**batch, **self.score_reference(batch)}
        return batch["ref_logps"], batch["ref_kl_logps"]

    def compute(self, batch: dict) -> tuple[torch.Tensor, dict]:
        n = self.rows_in(batch)
        matched = answer_logprobs(self.model, select_rows(batch, slice(0, n)))
        with torch.no_grad():  # z₀ is detached, so the mismatched half needs no backward pass
            mismatched = answer_logprobs(self.model, select_rows(batch, slice(n, 2 * n)))
        ref, ref_kl = self.reference_logps(batch)
        # z₀ is averaged over every device's batch before kto_loss clamps it at 0.
        kl = self.mean_across_devices(kto_kl_estimate(mismatched.logps, ref_kl))
        desirable = batch["label"]
        out = kto_loss(
            matched.logps,
            ref,
            desirable,
            kl,
            beta=self.beta,
            desirable_weight=self.desirable_weight,
            undesirable_weight=self.undesirable_weight,
        )
        n_d, n_u = int(desirable.sum()), int((~desirable).sum())
        d_rewards, u_rewards = out.rewards[desirable], out.rewards[~desirable]
        metrics = {  # (value, rows it averages): a side absent from the batch is not logged
            "kl": kl.clamp(min=0),
            "rewards/chosen": (d_rewards.mean(), n_d),
            "rewards/rejected": (u_rewards.mean(), n_u),
            "rewards/margins": (d_rewards.mean() - u_rewards.mean(), min(n_d, n_u)),
            "logps/chosen": (matched.logps[desirable].detach().mean(), n_d),
            "logps/rejected": (matched.logps[~desirable].detach().mean(), n_u),
        }
        return step_mean(out.losses, None, *self.step_count(batch, "rows")), metrics
