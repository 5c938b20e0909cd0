"""PPO for RLHF with four models: policy (trained), reference (frozen), reward model (frozen) and
value model (initialised from the reward model, trained).

One training step = one rollout: sample answers to a batch of prompts, score them, turn scores and
per-token KL penalties into GAE advantages, then run `num_ppo_epochs` passes over
`num_mini_batches` mini-batches, one optimizer step each (Lightning manual optimisation).
"""

from __future__ import annotations

import logging
import math

import torch
from omegaconf import DictConfig

from alignlab.algorithms.base import AlignmentModule, disable_dropout
from alignlab.errors import ConfigError
from alignlab.losses.ppo import ppo_policy_loss, ppo_value_loss
from alignlab.losses.rlhf import gae, kl_penalty_rewards, masked_mean, masked_whiten, truncate_after_eos
from alignlab.models.logprobs import answer_logprobs
from alignlab.models.reference import Frozen, ReferenceModel
from alignlab.models.reward import VALUE_HEAD_FILE, RewardModel, is_reward_model_folder
from alignlab.online.backends import build_backend, check_backend_spec
from alignlab.online.generation import exact_match, stop_token_ids
from alignlab.online.rollout import pack, prompt_ids, response_positions, sample
from alignlab.online.samples import log_samples, with_columns
from alignlab.runner.checks import Checks

log = logging.getLogger(__name__)


class PPO(AlignmentModule):
    disables_dropout = True
    counters = ("episodes", "rollouts")
    hparam_names = (
        "reward_model",
        "value_model",
        "ref_model",
        "num_ppo_epochs",
        "num_mini_batches",
        "micro_batch_size",
        "local_rollout_forward_batch_size",
        "generation_backend",
        "response_length",
        "temperature",
        "missing_eos_penalty",
        "kl_coef",
        "whiten_rewards",
        "cliprange",
        "vf_coef",
        "cliprange_value",
        "gamma",
        "lam",
        "num_sample_generations",
    )
    reward_model: str
    value_model: str | None
    ref_model: str | None
    num_ppo_epochs: int
    num_mini_batches: int
    micro_batch_size: int | None
    local_rollout_forward_batch_size: int
    generation_backend: dict | None
    response_length: int
    temperature: float
    missing_eos_penalty: float | None
    kl_coef: float
    whiten_rewards: bool
    cliprange: float
    vf_coef: float
    cliprange_value: float
    gamma: float
    lam: float
    num_sample_generations: int

    def __init__(self, model, tokenizer, optim, evaluation=None, **hparams):
        super().__init__(model, tokenizer, optim, evaluation, **hparams)
        self.automatic_optimization = False  # several optimizer steps per rollout
        dtype = next(model.parameters()).dtype
        self.value = RewardModel.from_pretrained(self.value_model or self.reward_model, dtype=dtype)
        disable_dropout(self.value)
        self.scorer = Frozen(RewardModel.from_pretrained(self.reward_model, dtype=dtype))
        self.reference = ReferenceModel.from_folder(model, self.ref_model) if self.ref_model else ReferenceModel(model)
        self.frozen = [self.reference, self.scorer]
        self.episodes = 0  # prompts rolled out so far
        self.rollouts = 0
        self.backend = build_backend(self.generation_backend)

    # -- config ---------------------------------------------------------------------------------
    @classmethod
    def check_config(cls, algorithm: DictConfig) -> None:
        checks = Checks(algorithm, "algorithm")
        checks.non_negative("kl_coef", "vf_coef").positive("cliprange", "cliprange_value", "temperature")
        checks.within("gamma", 0, 1).within("lam", 0, 1)
        checks.at_least(1, "num_ppo_epochs", "num_mini_batches", "local_rollout_forward_batch_size", "response_length")
        checks.at_least(0, "num_sample_generations")
        check_backend_spec(algorithm.generation_backend)
        if algorithm.micro_batch_size is not None:
            checks.at_least(1, "micro_batch_size")
        if algorithm.missing_eos_penalty is not None:
            checks.non_negative("missing_eos_penalty")
        for key in ("reward_model", "value_model"):
            folder = algorithm[key]
            if folder is None and key == "value_model":
                continue
            if not is_reward_model_folder(folder):
                raise ConfigError(
                    f"algorithm.{key}={folder} is not a reward-model folder (no {VALUE_HEAD_FILE}); "
                    "train one with algorithm=rm and give its <run>/model folder"
                )

    @classmethod
    def check_run(cls, cfg: DictConfig) -> None:
        batch, minis = cfg.data.batch_size, cfg.algorithm.num_mini_batches
        if batch % minis:
            raise ConfigError(
                f"batch_size ({batch} prompts per rollout) must be divisible by algorithm.num_mini_batches ({minis})"
            )
        micro = cfg.algorithm.micro_batch_size
        if micro is not None and (batch // minis) % micro:
            raise ConfigError(
                f"the mini-batch (batch_size / algorithm.num_mini_batches = {batch // minis}) must be "
                f"divisible by algorithm.micro_batch_size ({micro})"
            )

    # -- rollout --------------------------------------------------------------------------------
    @torch.no_grad()
    def rollout(self, batch: dict) -> dict:
        """Sample, score and compute advantages for a batch of left-padded prompts."""
        chunk = self.local_rollout_forward_batch_size
        self.backend.sync(self.model)
        samples = sample(
            self.model,
            self.tokenizer,
            batch,
            self.response_length,
            self.temperature,
            chunk,
            step=self.rollouts,
            backend=self.backend,
        )
        seqs, starts, mask, has_eos = samples.seqs, samples.starts, samples.mask, samples.has_eos
        length, n = mask.shape[1], mask.shape[0]
        logprobs, ref_logprobs, values, scores = [], [], [], []
        for i in range(0, n, chunk):
            sub = {k: v[i : i + chunk] for k, v in seqs.items()}
            logprobs.append(answer_logprobs(self.model, sub, self.temperature).token_logps)
            ref_logprobs.append(self.reference.answer_logprobs(sub, self.temperature).token_logps)
            values.append(self.value.values(sub["input_ids"], sub["attention_mask"]))
            scores.append(self.scorer(sub["input_ids"], sub["attention_mask"], sub["loss_mask"]))
        logprobs = response_positions(torch.cat(logprobs), starts, length) * mask
        ref_logprobs = response_positions(torch.cat(ref_logprobs), starts, length) * mask
        values = response_positions(torch.cat(values), starts, length).float() * mask
        scores = torch.cat(scores).float()
        if self.missing_eos_penalty is not None:
            scores = scores - self.missing_eos_penalty * (~has_eos).float()

        rewards, non_score_reward = kl_penalty_rewards(logprobs, ref_logprobs, scores, mask, self.kl_coef)
        total = self.sum_across_devices  # whitening statistics are the whole rollout's, on every device
        if self.whiten_rewards:
            rewards = masked_whiten(rewards, mask, shift_mean=False, total=total) * mask
        advantages, returns = gae(rewards, values, mask, self.gamma, self.lam)
        advantages = masked_whiten(advantages, mask, total=total) * mask
        kl = ((logprobs - ref_logprobs) * mask).sum(1)
        stats = {
            "objective/kl": kl.mean(),
            "objective/entropy": (-logprobs * mask).sum(1).mean(),
            "objective/non_score_reward": non_score_reward.sum(1).mean(),
            "objective/rlhf_reward": (scores + non_score_reward.sum(1)).mean(),
            "objective/scores": scores.mean(),
            "val/num_eos_tokens": has_eos.float().sum(),
        }
        return {
            **seqs,
            "starts": starts,
            "mask": mask,
            "logprobs": logprobs,
            "values": values,
            "advantages": advantages,
            "returns": returns,
            "stats": stats,
        }

    # -- update ---------------------------------------------------------------------------------
    def ppo_update(self, rollout: dict, optimizer, scheduler=None, generator: torch.Generator | None = None) -> dict:
        """num_ppo_epochs × num_mini_batches optimizer steps; each mini-batch's gradient is accumulated
        over micro-batches whose losses are normalised by the mini-batch's token count, so it equals
        the gradient of the whole mini-batch at once."""
        n = rollout["input_ids"].shape[0]
        mini = n // self.num_mini_batches
        micro = self.micro_batch_size or mini
        length = rollout["mask"].shape[1]
        stats: dict[str, list] = {
            k: [] for k in ("approxkl", "clipfrac", "pg_loss", "vf_loss", "vf_clipfrac", "entropy", "ratio")
        }
        for _ in range(self.num_ppo_epochs):
            order = torch.randperm(n, generator=generator).to(self.device)
            for start in range(0, n, mini):
                rows = order[start : start + mini]
                # Losses are normalised by the mini-batch's tokens on every device, so the gradients
                # DDP averages add up to the whole mini-batch's token mean.
                tokens = self.sum_across_devices(rollout["mask"][rows].sum())
                for m in range(0, len(rows), micro):
                    idx = rows[m : m + micro]
                    sub = {k: rollout[k][idx] for k in ("input_ids", "attention_mask", "loss_mask")}
                    out = answer_logprobs(self.model, sub, self.temperature, entropy=True)
                    mask, starts = rollout["mask"][idx], rollout["starts"][idx]
                    new_logprobs = response_positions(out.token_logps, starts, length) * mask
                    vpred = response_positions(
                        self.value.values(sub["input_ids"], sub["attention_mask"]), starts, length
                    ).float()
                    policy = ppo_policy_loss(
                        new_logprobs,
                        rollout["logprobs"][idx],
                        rollout["advantages"][idx],
                        mask,
                        self.cliprange,
                        num_items_in_batch=tokens,
                        scale=self.loss_scale(),
                    )
                    vf_loss, vf_clipfrac = ppo_value_loss(
                        vpred,
                        rollout["values"][idx],
                        rollout["returns"][idx],
                        mask,
                        self.cliprange_value,
                        num_items_in_batch=tokens,
                        scale=self.loss_scale(),
                    )
                    loss = policy.loss + self.vf_coef * vf_loss
                    self.backpropagate(loss)
                    entropy = masked_mean(response_positions(out.token_entropy, starts, length), mask)
                    for key, value in zip(
                        stats,
                        (
                            policy.approxkl,
                            policy.clipfrac,
                            policy.loss * len(rows) / len(idx),
                            vf_loss * len(rows) / len(idx),
                            vf_clipfrac,
                            entropy,
                            policy.ratio,
                        ),
                    ):
                        stats[key].append(value.detach())
                self.optimizer_step_manually(optimizer, scheduler)
        mean = {k: torch.stack(v).mean() for k, v in stats.items()}
        return {
            "policy/approxkl_avg": mean["approxkl"],
            "policy/clipfrac_avg": mean["clipfrac"],
            "loss/policy_avg": mean["pg_loss"],
            "loss/value_avg": mean["vf_loss"],
            "val/clipfrac_avg": mean["vf_clipfrac"],
            "policy/entropy_avg": mean["entropy"],
            "val/ratio": mean["ratio"],
        }

    def training_step(self, batch: dict, batch_idx: int) -> None:
        rollout = self.rollout(batch)
        self.episodes += rollout["input_ids"].shape[0]
        scheduler = self.lr_schedulers()
        stats = self.ppo_update(rollout, self.optimizers(), scheduler)
        metrics = {
            **rollout["stats"],
            **stats,
            "lr": torch.tensor(scheduler.get_last_lr()[0]),
            "episodes": torch.tensor(float(self.episodes)),
        }
        self._log("train", metrics, rollout["input_ids"].shape[0], on_step=True)
        self.rollouts += 1  # batch_idx restarts every pass over the prompts; this does not
        if self.sample_every and self.rollouts % self.sample_every == 0:
            self.log_sample_table()

    @property
    def sample_every(self) -> int:
        """Rollouts between sample tables, so that num_sample_generations tables span the run."""
        if not self.num_sample_generations or self._trainer is None:
            return 0
        steps_per_rollout = self.num_ppo_epochs * self.num_mini_batches
        rollouts = math.ceil(self.trainer.max_steps / steps_per_rollout) if self.trainer.max_steps > 0 else 0
        return max(1, rollouts // self.num_sample_generations) if rollouts else 0

    # -- evaluation -----------------------------------------------------------------------------
    @torch.no_grad()
    def score_answers(self, batch: dict, tokens: torch.Tensor) -> torch.Tensor:
        """Reward-model scores of generated answers to the batch's prompts."""
        stops = stop_token_ids(self.model, self.tokenizer)
        cut, mask, ended = truncate_after_eos(tokens, stops, self.tokenizer.pad_token_id)
        answers = [row[: int(n)] for row, n in zip(cut.tolist(), mask.sum(-1))]
        seqs = pack(prompt_ids(batch), answers, ended, self.tokenizer.pad_token_id, self.device).seqs
        return self.scorer(seqs["input_ids"], seqs["attention_mask"], seqs["loss_mask"]).float()

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        tokens, texts = self.greedy_answers(batch)
        metrics = {"objective/scores": self.score_answers(batch, tokens).mean()}
        if self.evaluation.get("exact_match") and "solution" in batch:
            metrics["exact_match"] = exact_match(texts, batch["solution"]).mean()
        self._log("eval", metrics, len(texts), on_step=False)

    def log_sample_table(self, n: int = 16) -> None:
        """Greedy answers to the first held-out prompts, with their scores."""
        batch = next(iter(self.trainer.datamodule.val_dataloader()))
        columns = {k: v[:n] for k, v in batch.get("columns", {}).items()}
        batch = {
            k: (v[:n].to(self.device) if torch.is_tensor(v) else v[:n]) for k, v in batch.items() if k != "columns"
        }
        tokens, texts = self.greedy_answers(batch)
        scores = self.score_answers(batch, tokens).tolist()
        prompts = self.tokenizer.batch_decode(prompt_ids(batch))
        rows = [{"prompt": p, "answer": a, "score": s} for p, a, s in zip(prompts, texts, scores)]
        log_samples(self.trainer, with_columns(rows, columns))
