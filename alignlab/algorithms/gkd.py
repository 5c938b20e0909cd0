"""GKD: on-policy distillation (Agarwal et al., 2024, "On-Policy Distillation of Language Models:
Learning from Self-Generated Mistakes", arXiv:2306.13649; TRL's GKDTrainer).

The student (the policy) learns a frozen teacher's next-token distributions on every answer token, by
the generalised Jensen–Shannon divergence (alignlab.losses.gkd). Which answers: with probability
`lmbda` a step's answers are the student's own samples at `temperature` (on-policy, the paper's
Algorithm 1); otherwise the data's answers, or with `seq_kd` answers the teacher samples. One training
step = one batch of `batch_size` SFT rows = one optimizer step, cut into micro-batches by tokens once
its answers are known. Sampling (keyed, each prompt encoded once), evaluation and sample tables:
alignlab.algorithms.online.
"""

from __future__ import annotations

import lightning as L
import torch
from omegaconf import DictConfig

from alignlab.algorithms.online import OnlineModule
from alignlab.data.collate import collate_prompts, select_rows
from alignlab.errors import ConfigError
from alignlab.losses.gkd import generalized_jsd, gkd_loss
from alignlab.models.compatible import check_same_tokenizer
from alignlab.models.logprobs import answer_logits
from alignlab.models.teacher import load_teacher
from alignlab.online.generation import cut_at_stop, keyed_uniform, sample_keys, stop_token_ids
from alignlab.online.rollout import pack, prompt_ids, sample
from alignlab.runner.checks import Checks

ANSWER_KEYS = ("input_ids", "attention_mask", "loss_mask")


class WholeSteps(L.Callback):
    """Each training batch is one optimizer step's rows: GKD knows its answers' lengths only once it has
    sampled them, so it cuts the step into micro-batches itself (algorithm.max_tokens_per_micro_batch),
    and the data's own token budget, which would make Lightning accumulate micro-batches, is set aside."""

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        datamodule = getattr(trainer, "datamodule", None)
        if datamodule is not None and getattr(datamodule, "max_tokens_per_micro_batch", None) is not None:
            datamodule.max_tokens_per_micro_batch = None


class GKD(OnlineModule):
    trains_on_images = False  # the teacher reads text only (refused before training, alignlab.train)
    counters = ("rollouts",)  # steps so far: they key the on-policy draw and the sampling
    eval_metric = "loss"

    def __init__(self, model, tokenizer, optim, evaluation=None, **hparams):
        super().__init__(model, tokenizer, optim, evaluation, **hparams)
        dtype = next(model.parameters()).dtype
        self.teacher = load_teacher(self.teacher_model_name_or_path, dtype)
        self.frozen.append(self.teacher)
        self.rollouts = 0

    @property
    def steps_per_rollout(self) -> int:
        return 1

    def configure_callbacks(self) -> list[L.Callback]:
        return [*super().configure_callbacks(), WholeSteps()]

    def scoring_models(self) -> list[torch.nn.Module]:
        return [*super().scoring_models(), self.teacher.module]

    # -- config ---------------------------------------------------------------------------------
    @classmethod
    def check_config(cls, algorithm: DictConfig) -> None:
        super().check_config(algorithm)
        checks = Checks(algorithm, "algorithm").within("lmbda", 0.0, 1.0).within("beta", 0.0, 1.0)
        checks.at_least(1, "max_new_tokens", "generation_chunk_size")
        if not isinstance(algorithm.seq_kd, bool):
            raise ConfigError(f"algorithm.seq_kd must be true or false, got {algorithm.seq_kd!r}")

    @classmethod
    def check_run(cls, cfg: DictConfig) -> None:
        """The teacher shares the student's tokenizer and vocabulary (read from their folders' tokenizer
        and config files, before either model loads)."""
        super().check_run(cfg)
        check_same_tokenizer(
            cfg.model,
            cfg.algorithm.teacher_model_name_or_path,
            "algorithm.teacher_model_name_or_path",
            require_chat_template=cfg.algorithm.requires_chat_template,
            names=("student", "teacher"),
            same_logit_width=True,
        )

    # -- which answers a step trains on -----------------------------------------------------------
    def on_policy_step(self) -> bool:
        """Whether this step trains on the student's own samples: a draw below `lmbda`, keyed on (seed,
        steps so far), so every process (and a resumed run) draws alike. TRL draws once per step too."""
        key = sample_keys(torch.initial_seed(), self.rollouts, torch.tensor([-1]))  # -1: no data row's key
        return bool(keyed_uniform(key, 0)[0] < self.lmbda)

    def prompts_of(self, batch: dict) -> dict:
        """The batch's prompts, left-padded for sampling (prompt_input_ids, prompt_attention_mask, index):
        an SFT training batch's tokens before each row's answer."""
        if "prompt_input_ids" in batch:
            return batch
        ids, answer = batch["input_ids"], batch["loss_mask"].bool()
        starts = torch.where(answer.any(1), answer.long().argmax(1), batch["attention_mask"].sum(1))
        prompts = collate_prompts(
            [row[:start].tolist() for row, start in zip(ids, starts)], self.tokenizer.pad_token_id
        )
        return {**{k: v.to(ids.device) for k, v in prompts.items()}, "index": batch["index"]}

    def answers_for(self, batch: dict) -> tuple[dict, bool]:
        """(right-padded prompt + answer rows with their loss_mask, whether the student sampled them)."""
        if self.on_policy_step():
            samples = self.sample_answers(self.prompts_of(batch), self.max_new_tokens, self.generation_chunk_size)
            return samples.seqs, True
        if self.seq_kd:  # the teacher samples in this process (a generation backend follows the student)
            samples = sample(
                self.teacher.module,
                self.tokenizer,
                self.prompts_of(batch),
                self.max_new_tokens,
                self.temperature,
                self.generation_chunk_size,
                step=self.rollouts,
            )
            return samples.seqs, False
        return {k: batch[k] for k in ANSWER_KEYS}, False

    # -- the update ---------------------------------------------------------------------------------
    def train_on(self, batch: dict, optimizer, scheduler) -> tuple[dict, int]:
        """One optimizer step: the step's answers (answers_for), cut into micro-batches by tokens, each
        adding its share of the step's mean divergence per answer token (over every process)."""
        seqs, on_policy = self.answers_for(batch)
        tokens = self.sum_across_devices(seqs["loss_mask"][:, 1:].sum().float())
        scale = self.loss_scale()  # DDP averages the devices' gradients
        applied = torch.zeros((), device=self.device)
        for idx in self.micro_batches(seqs["attention_mask"]):
            rows = select_rows(seqs, idx)
            with torch.no_grad():
                teacher, _ = answer_logits(self.teacher.module, rows)
            student, _ = answer_logits(self.model, rows)
            loss = gkd_loss(student, teacher, self.beta, num_items_in_batch=tokens, scale=scale).loss
            self.backpropagate(loss)
            applied = applied + loss.detach()
        self.optimizer_step_manually(optimizer, scheduler)
        metrics = {
            "loss": self.mean_across_devices(applied),  # the step's mean divergence per answer token
            "num_tokens": tokens,
            "on_policy": torch.tensor(float(on_policy), device=self.device),
        }
        return metrics, len(batch["index"])

    # -- evaluation -----------------------------------------------------------------------------
    @torch.no_grad()
    def token_divergences(self, seqs: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(JSD(β) between teacher and student at each answer position [K], each position's row [K]) of
        right-padded prompt + answer rows, at temperature 1 as the loss."""
        teacher, _ = answer_logits(self.teacher.module, seqs)
        student, rows = answer_logits(self.model, seqs)
        return generalized_jsd(student, teacher, self.beta), rows

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        """eval/loss: the divergence per answer token on the held-out rows' own answers (TRL's eval loss);
        eval/exact_match of the student's greedy answers, where the data has solutions."""
        jsd, _ = self.token_divergences({k: batch[k] for k in ANSWER_KEYS})
        metrics = {"loss": jsd.mean() if jsd.numel() else jsd.new_zeros(())}
        if self.measures_exact_match(batch):
            metrics["exact_match"] = self.exact_match(batch).mean()
        self._log("eval", metrics, len(batch["index"]), on_step=False)

    def held_out_prompts(self, n: int) -> dict:
        """The first `n` held-out rows, their `solution` (where the data has one) shown in the sample tables."""
        batch = super().held_out_prompts(n)
        if "solution" in batch:
            batch["columns"] = {"solution": batch["solution"]}
        return batch

    @torch.no_grad()
    def eval_scores(self, batch: dict, tokens: torch.Tensor, texts: list[str]) -> torch.Tensor:
        """[B] the mean divergence per token between teacher and student on each greedy answer (the
        sample tables' `score`; lower: closer to the teacher)."""
        answers, has_eos = cut_at_stop(tokens, stop_token_ids(self.model, self.tokenizer))
        seqs = pack(prompt_ids(batch), answers, has_eos, self.tokenizer.pad_token_id, self.device).seqs
        jsd, rows = self.token_divergences(seqs)
        count = jsd.new_zeros(len(answers)).index_add(0, rows, torch.ones_like(jsd))
        return jsd.new_zeros(len(answers)).index_add(0, rows, jsd) / count.clamp(min=1)
