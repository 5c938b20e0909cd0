"""DPO: preference optimisation against a frozen reference, with an optional NLL (RPO) term; the loss
types the field compares with, alone or mixed with weights (MPO)."""

from __future__ import annotations

from collections.abc import Mapping

import lightning as L
import torch
from omegaconf import DictConfig, ListConfig

from alignlab.algorithms.pairwise import PairwiseModule, preference_metrics
from alignlab.errors import ConfigError
from alignlab.losses import (
    DPO_LOSSES,
    F_DIVERGENCES,
    dpo_loss,
    implicit_rewards,
    length_desensitised_logps,
    nll_loss,
    step_mean,
    wpo_weights,
)
from alignlab.models.compatible import check_ref_model
from alignlab.models.logprobs import AnswerLogps, answer_logprobs
from alignlab.runner.checks import Checks


def loss_types(loss_type: str | Mapping | list) -> tuple:
    """`loss_type` as a tuple: one loss type (a name, a dotted path or a `{_target_: ...}` mapping), or a
    list of them (MPO)."""
    return (loss_type,) if isinstance(loss_type, (str, Mapping)) else tuple(loss_type)


class DPO(PairwiseModule):
    """loss = Σ_k w_k · mean(loss_k) + rpo_alpha · NLL(y_w), against a frozen reference (the starting policy,
    or `ref_model`): the means over the optimizer step's pairs, `sft` and the NLL over its chosen tokens."""

    counters = ("optimizer_steps",)  # sync_ref_model's step count, saved for a resumed run

    @property
    def uses_reference(self) -> bool:
        return not self.reference_free  # reference-free: log π_ref = 0, no reference model loaded

    @property
    def reference_folder(self) -> str | None:
        return self.ref_model  # null: the starting policy (or its disabled LoRA adapter)

    @property
    def loss_types(self) -> tuple:
        return loss_types(self.loss_type)

    @property
    def loss_names(self) -> tuple[str, ...]:
        """The loss types' names in DPO_LOSSES (a dotted path's, a `_target_`'s)."""
        return tuple(DPO_LOSSES.resolve(spec).name for spec in self.loss_types)

    @property
    def loss_weights_used(self) -> tuple[float, ...]:
        """loss_weights, or 1.0 for each loss type when null (TRL's default)."""
        return tuple(self.loss_weights) if self.loss_weights is not None else (1.0,) * len(self.loss_types)

    @property
    def step_sums(self) -> tuple[str, ...]:  # each term is a share of the step's mean, like the loss
        return ("loss", "nll_loss", *self.term_metrics())

    def term_metrics(self) -> tuple[str, ...]:
        """The per-term metric names, logged when several loss types are mixed: `loss/<loss_type>`."""
        return tuple(f"loss/{name}" for name in self.loss_names) if len(self.loss_types) > 1 else ()

    # -- config ---------------------------------------------------------------------------------
    @classmethod
    def check_config(cls, algorithm: DictConfig) -> None:
        checks = Checks(algorithm, "algorithm").positive("beta", "discopop_tau").non_negative("rpo_alpha")
        checks.within("label_smoothing", 0, 0.5, high_open=True)
        for key in ("ipo_normalize_length", "reference_free", "use_weighting", "sync_ref_model"):
            if not isinstance(algorithm[key], bool):
                raise ConfigError(f"algorithm.{key} must be true or false, got {algorithm[key]!r}")
        if algorithm.ld_alpha is not None:
            checks.within("ld_alpha", 0.0, 1.0)
        F_DIVERGENCES.check(algorithm.f_divergence_type)
        checks.positive("f_alpha_divergence_coef")
        cls.check_loss_types(algorithm)
        if algorithm.reference_free and (algorithm.ref_model is not None or algorithm.sync_ref_model):
            raise ConfigError(
                "algorithm.reference_free=true uses no reference model (log π_ref = 0): unset algorithm.ref_model "
                "and algorithm.sync_ref_model"
            )

    @classmethod
    def check_loss_types(cls, algorithm: DictConfig) -> None:
        """loss_type (each resolved in DPO_LOSSES: a name, a dotted path, a `_target_`), loss_weights, and
        what each loss type's properties ask of the other options."""
        kinds = algorithm.loss_type
        if not isinstance(kinds, (str, Mapping, list, ListConfig)) or not loss_types(kinds):
            raise ConfigError(f"algorithm.loss_type must be a loss type or a list of them, got {kinds!r}")
        entries = [DPO_LOSSES.resolve(spec) for spec in loss_types(kinds)]
        names = [entry.name for entry in entries]
        if len(set(names)) != len(names):
            raise ConfigError(f"algorithm.loss_type names a loss type twice: {names}")
        weights = algorithm.loss_weights
        if weights is not None:
            if not isinstance(weights, (list, ListConfig)) or len(weights) != len(names):
                raise ConfigError(
                    f"algorithm.loss_weights must be null or a list of {len(names)} numbers, one per "
                    f"algorithm.loss_type {names}, got {weights!r}"
                )
            if any(isinstance(w, bool) or not isinstance(w, (int, float)) or not w >= 0 for w in weights):
                raise ConfigError(f"algorithm.loss_weights must be numbers >= 0, got {list(weights)}")
        for entry in entries:
            if entry.needs_label_smoothing and not algorithm.label_smoothing > 0:
                raise ConfigError(f"algorithm.loss_type={entry.name} needs algorithm.label_smoothing > 0 (its ε)")
        outside = [entry.name for entry in entries if not entry.f_divergence]
        if algorithm.f_divergence_type != "reverse_kl" and outside:
            raise ConfigError(
                f"algorithm.f_divergence_type={algorithm.f_divergence_type} generalises only the loss types built on "
                f"the chosen − rejected score difference {DPO_LOSSES.names(f_divergence=True)}, not {outside}: set "
                "algorithm.f_divergence_type=reverse_kl"
            )
        if algorithm.use_weighting and (sorting := [entry.name for entry in entries if entry.sorts_pairs]):
            raise ConfigError(
                f"algorithm.use_weighting=true (WPO) weights each pair, and loss_type {sorting} sorts the pairs, "
                "so a weight would land on another pair: set algorithm.use_weighting=false"
            )

    @classmethod
    def check_run(cls, cfg: DictConfig) -> None:
        algorithm = cfg.algorithm
        cls.check_sync_ref_model(cfg)
        if algorithm.sync_ref_model and algorithm.precompute_ref_log_probs:
            raise ConfigError(
                "algorithm.sync_ref_model=true moves the reference during training, so its log-probs cannot be "
                "computed once before it: set algorithm.precompute_ref_log_probs=false"
            )
        check_ref_model(cfg)

    def configure_callbacks(self) -> list[L.Callback]:
        return super().configure_callbacks() if self.uses_reference else []  # reference-free: nothing to score

    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        self.sync_reference()

    # -- log-probs --------------------------------------------------------------------------------
    def sequence_logps(self, chosen: AnswerLogps, rejected: AnswerLogps) -> tuple[torch.Tensor, torch.Tensor]:
        """The answers' log-probs the losses compare: summed, or LD-DPO's with ld_alpha."""
        if self.ld_alpha is None:
            return chosen.logps, rejected.logps
        shared = torch.minimum(chosen.num_tokens, rejected.num_tokens)
        return (
            length_desensitised_logps(chosen.token_logps, chosen.mask, shared, self.ld_alpha),
            length_desensitised_logps(rejected.token_logps, rejected.mask, shared, self.ld_alpha),
        )

    def score_reference(self, batch: dict) -> dict[str, torch.Tensor]:
        chosen, rejected = self.reference.answer_logprobs(batch).split_pairs(self.rows_in(batch))
        ref_chosen, ref_rejected = self.sequence_logps(chosen, rejected)
        return {"ref_chosen_logps": ref_chosen, "ref_rejected_logps": ref_rejected}

    def reference_logps(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Cached per-row values when the batch carries them, else a no-grad reference forward; zeros when
        reference_free."""
        if self.reference_free:
            zeros = torch.zeros(self.rows_in(batch), device=self.device)
            return zeros, zeros
        if "ref_chosen_logps" not in batch:
            batch = {**batch, **self.score_reference(batch)}
        return batch["ref_chosen_logps"], batch["ref_rejected_logps"]

    def policy_pairs(self, batch: dict) -> tuple[AnswerLogps, AnswerLogps]:
        if not self.use_weighting:
            return super().policy_pairs(batch)
        out = answer_logprobs(self.model, batch, sum_sq_probs=True)  # WPO reads log Σ_v π(v)²
        return out.split_pairs(self.rows_in(batch))

    # -- the loss -----------------------------------------------------------------------------------
    def compute(self, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        chosen, rejected = self.policy_pairs(batch)
        policy_chosen, policy_rejected = self.sequence_logps(chosen, rejected)
        ref_chosen, ref_rejected = self.reference_logps(batch)
        nll = nll_loss(chosen.token_logps, chosen.mask, *self.step_count(batch, "chosen_tokens"))
        pair_weights = None
        if self.use_weighting:
            pair_weights = wpo_weights(chosen.token_logps, chosen.token_log_sum_sq_probs, chosen.mask)
            pair_weights = pair_weights * wpo_weights(
                rejected.token_logps, rejected.token_log_sum_sq_probs, rejected.mask
            )
        loss, terms = None, {}
        for spec, name, weight in zip(self.loss_types, self.loss_names, self.loss_weights_used):
            if DPO_LOSSES[name].token_mean:  # the chosen answer's NLL over the step's chosen tokens (TRL's `sft`);
                term = nll  # WPO weighs pairs, not this token mean (TRL 1.16 fails on sft with use_weighting)
            else:
                losses = dpo_loss(
                    policy_chosen,
                    policy_rejected,
                    ref_chosen,
                    ref_rejected,
                    beta=self.beta,
                    loss_type=spec,
                    label_smoothing=self.label_smoothing,
                    discopop_tau=self.discopop_tau,
                    chosen_lengths=chosen.num_tokens,
                    rejected_lengths=rejected.num_tokens,
                    ipo_normalize_length=self.ipo_normalize_length,
                    f_divergence_type=self.f_divergence_type,
                    f_alpha_divergence_coef=self.f_alpha_divergence_coef,
                ).losses
                losses = losses if pair_weights is None else losses * pair_weights
                term = step_mean(losses, None, *self.step_count(batch, "rows"))
            terms[f"loss/{name}"] = term.detach()
            loss = weight * term if loss is None else loss + weight * term
        loss = loss + self.rpo_alpha * nll if self.rpo_alpha > 0 else loss
        # The rewards every loss type reports (TRL's): β·(log π − log π_ref) of each answer
        chosen_rewards = implicit_rewards(policy_chosen - ref_chosen, self.beta)
        rejected_rewards = implicit_rewards(policy_rejected - ref_rejected, self.beta)
        metrics = preference_metrics(chosen_rewards, rejected_rewards, chosen, rejected)
        terms = {k: terms[k] for k in self.term_metrics()}
        return loss, {**metrics, "nll_loss": nll.detach(), **terms}
