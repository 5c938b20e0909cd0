"""KTO: unpaired desirable / undesirable answers against a frozen reference and a KL reference point."""

from __future__ import annotations

import logging

import lightning as L
import torch
from omegaconf import DictConfig

from alignlab.algorithms.base import AlignmentModule
from alignlab.data.collate import select_rows
from alignlab.losses import KTO_LOSSES, kto_kl_estimate, kto_loss, kto_weight_advice, step_mean
from alignlab.models.compatible import check_ref_model
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
    step_differences = {"rewards/margins": ("rewards/chosen", "rewards/rejected")}
    _step_reference_point: torch.Tensor | None = None  # z₀ of the optimizer step being trained

    @property
    def reference_folder(self) -> str | None:
        return self.ref_model  # null: the starting policy (or its disabled LoRA adapter)

    @classmethod
    def check_config(cls, algorithm: DictConfig) -> None:
        Checks(algorithm, "algorithm").positive("beta").non_negative("desirable_weight", "undesirable_weight")
        KTO_LOSSES.check(algorithm.loss_type)

    @classmethod
    def check_run(cls, cfg: DictConfig) -> None:
        check_ref_model(cfg)

    def configure_callbacks(self) -> list[L.Callback]:
        return [*super().configure_callbacks(), WeightAdvice()]

    def score_reference(self, batch: dict) -> dict[str, torch.Tensor]:
        n, ref = self.rows_in(batch), self.reference.answer_logprobs(batch)
        return {"ref_logps": ref.logps[:n], "ref_kl_logps": ref.logps[n:]}

    def reference_logps(self, batch: dict) -> torch.Tensor:
        """The reference's summed log-probs [B] of the matched answers: cached per row when the batch
        carries them, else a reference forward over the matched half."""
        if "ref_logps" in batch:
            return batch["ref_logps"]
        return self.reference.answer_logprobs(select_rows(batch, slice(0, self.rows_in(batch)))).logps

    @torch.no_grad()  # z₀ is detached, so the mismatched answers need no backward pass
    def reference_point(self, batch: dict) -> torch.Tensor:
        """z₀ (before kto_loss clamps it at 0), a scalar. In training, over the optimizer step's
        mismatched pairs: the step's first micro-batch carries all of them (`step_batches`, see
        LabelledDataModule.add_step_batches), scored one micro-batch at a time, and the value is kept
        for the step's other micro-batches (the policy does not change within a step); so the step is
        the same however it is cut. Else (validation, a direct call) over this batch's. Every device's
        pairs count (summed over devices)."""
        if "step_batches" in batch:
            total, count = 0.0, 0
            for part in batch["step_batches"]:
                policy, ref = self._mismatched_logps(part)
                total, count = total + (policy - ref).sum(), count + self.rows_in(part)
            count = self.sum_across_devices(torch.tensor(count, device=self.device))
            self._step_reference_point = self.sum_across_devices(total) / count
        if "step_totals" in batch and self._step_reference_point is not None:
            return self._step_reference_point
        return self.mean_across_devices(kto_kl_estimate(*self._mismatched_logps(batch)))

    def _mismatched_logps(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(policy, reference) summed log-probs [B] of a batch's mismatched half; the reference's cached
        when the batch carries them."""
        n = self.rows_in(batch)
        mismatched = select_rows(batch, slice(n, 2 * n))
        policy = answer_logprobs(self.model, mismatched).logps
        if "ref_kl_logps" in batch:
            return policy, batch["ref_kl_logps"]
        return policy, self.reference.answer_logprobs(mismatched).logps

    def compute(self, batch: dict) -> tuple[torch.Tensor, dict]:
        n = self.rows_in(batch)
        if KTO_LOSSES.resolve(self.loss_type).reference_point:
            kl = self.reference_point(batch)  # first: its forwards then run while no activations are kept
        else:  # e.g. APO-zero has no reference point: the mismatched rows are not scored (TRL logs kl 0)
            kl = torch.zeros((), device=self.device)
        matched = answer_logprobs(self.model, select_rows(batch, slice(0, n)))
        ref = self.reference_logps(batch)
        desirable = batch["label"]
        out = kto_loss(
            matched.logps,
            ref,
            desirable,
            kl,
            beta=self.beta,
            desirable_weight=self.desirable_weight,
            undesirable_weight=self.undesirable_weight,
            loss_type=self.loss_type,
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
