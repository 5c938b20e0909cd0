"""PPO for RLHF with four models: policy (trained), reference (frozen), reward model (frozen) and
value model (initialised from the reward model, trained).

One training step = one rollout: sample answers to a batch of prompts, score them, turn scores and
per-token KL penalties into GAE advantages, then run `num_ppo_epochs` passes over
`num_mini_batches` mini-batches, one optimizer step each (Lightning manual optimisation). Sampling,
evaluation and sample tables: alignlab.algorithms.online.
"""

from __future__ import annotations

import logging

import torch
from omegaconf import DictConfig

from alignlab.algorithms.online import OnlineModule
from alignlab.data.collate import select_rows
from alignlab.errors import ConfigError
from alignlab.losses.ppo import ppo_policy_loss, ppo_value_loss
from alignlab.losses.rlhf import gae, kl_penalty_rewards, masked_mean, masked_whiten
from alignlab.models.modes import disable_dropout
from alignlab.models.reference import Frozen
from alignlab.models.reward import VALUE_HEAD_FILE, RewardModel, is_reward_model_folder
from alignlab.online.generation import cut_at_stop, stop_token_ids
from alignlab.online.rollout import pack, prompt_ids, response_positions, token_logprobs
from alignlab.runner.checks import Checks

log = logging.getLogger(__name__)


class PPO(OnlineModule):
    trains_on_images = False  # its value model does not read images yet: refused before training (alignlab.train)

    uses_reference = True
    counters = ("episodes", "rollouts")

    def __init__(self, model, tokenizer, optim, evaluation=None, **hparams):
        super().__init__(model, tokenizer, optim, evaluation, **hparams)
        dtype = next(model.parameters()).dtype
        self.value = RewardModel.from_pretrained(self.value_model or self.reward_model, dtype=dtype)
        if self.disable_dropout:  # the value model trains beside the policy: the same setting
            disable_dropout(self.value)
        self.scorer = Frozen(RewardModel.from_pretrained(self.reward_model, dtype=dtype))
        self.frozen.append(self.scorer)
        self.episodes = 0  # prompts rolled out so far
        self.rollouts = 0

    @property
    def reference_folder(self) -> str | None:
        return self.ref_model  # null: the starting policy (or its disabled LoRA adapter)

    @property
    def steps_per_rollout(self) -> int:
        return self.num_ppo_epochs * self.num_mini_batches

    # -- config ---------------------------------------------------------------------------------
    @classmethod
    def check_config(cls, algorithm: DictConfig) -> None:
        super().check_config(algorithm)
        checks = Checks(algorithm, "algorithm")
        checks.non_negative("kl_coef", "vf_coef").positive("cliprange", "cliprange_value")
        checks.within("gamma", 0, 1).within("lam", 0, 1)
        checks.at_least(1, "num_ppo_epochs", "num_mini_batches", "local_rollout_forward_batch_size", "response_length")
        if algorithm.missing_eos_penalty is not None:
            checks.non_negative("missing_eos_penalty")
        for key in ("reward_model", "value_model"):
            folder = algorithm[key]
            if folder is None and key == "value_model":
                continue
            if not is_reward_model_folder(folder):
                raise ConfigError(
                    f"algorithm.{key}={folder} is not a reward-model folder (no {VALUE_HEAD_FILE}, nor a one-label "
                    "AutoModelForSequenceClassification); train one with algorithm=rm and give its <run>/model folder"
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
        samples = self.sample_answers(batch, self.response_length, chunk)
        seqs, starts, mask, has_eos = samples.seqs, samples.starts, samples.mask, samples.has_eos
        length, n = mask.shape[1], mask.shape[0]
        logprobs, ref_logprobs, values, scores = [], [], [], []
        for i in range(0, n, chunk):
            sub, at = {k: v[i : i + chunk] for k, v in seqs.items()}, starts[i : i + chunk]
            logprobs.append(token_logprobs(self.model, sub, at, length, self.temperature))
            ref_logprobs.append(token_logprobs(self.reference, sub, at, length, self.temperature))
            values.append(response_positions(self.value.values(sub["input_ids"], sub["attention_mask"]), at, length))
            scores.append(self.scorer(sub["input_ids"], sub["attention_mask"], sub["loss_mask"]))
        logprobs = torch.cat(logprobs) * mask
        ref_logprobs = torch.cat(ref_logprobs) * mask
        values = torch.cat(values).float() * mask
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
        over micro-batches (its rows cut by tokens, `micro_batches`; each forward cut to its own longest
        row) whose losses are normalised by the mini-batch's token count, so it equals the gradient of
        the whole mini-batch at once. Logged: each mini-batch's loss and token means, averaged over the
        mini-batches (the same however they are cut)."""
        n = rollout["input_ids"].shape[0]
        mini = n // self.num_mini_batches
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
                local_tokens = rollout["mask"][rows].sum().clamp(min=1)
                sums = dict.fromkeys(stats, 0.0)  # the mini-batch's losses and token means, summed over micro-batches
                for positions in self.micro_batches(rollout["attention_mask"][rows]):
                    idx = rows[positions]
                    sub = select_rows(rollout, idx)
                    mask, starts = rollout["mask"][idx], rollout["starts"][idx]
                    new_logprobs, entropy = token_logprobs(
                        self.model, sub, starts, length, self.temperature, entropy=True
                    )
                    new_logprobs = new_logprobs * mask
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
                    share = mask.sum() / local_tokens  # this micro-batch's share of the mini-batch's tokens
                    for key, value in (
                        ("approxkl", policy.approxkl * share),
                        ("clipfrac", policy.clipfrac * share),
                        ("pg_loss", policy.loss),  # already a share of the mini-batch's loss
                        ("vf_loss", vf_loss),
                        ("vf_clipfrac", vf_clipfrac * share),
                        ("entropy", masked_mean(entropy, mask) * share),
                        ("ratio", policy.ratio * share),
                    ):
                        sums[key] = sums[key] + value.detach()
                for key, value in sums.items():
                    stats[key].append(value)
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

    def train_on(self, batch: dict, optimizer, scheduler) -> tuple[dict, int]:
        rollout = self.rollout(batch)
        self.episodes += rollout["input_ids"].shape[0]
        stats = self.ppo_update(rollout, optimizer, scheduler)
        metrics = {
            **rollout["stats"],
            **stats,
            "lr": torch.tensor(scheduler.get_last_lr()[0]),
            "episodes": torch.tensor(float(self.episodes)),
        }
        return metrics, rollout["input_ids"].shape[0]

    # -- evaluation: the reward model's score of greedy answers -------------------------------------
    eval_metric = "objective/scores"

    @torch.no_grad()
    def eval_scores(self, batch: dict, tokens: torch.Tensor, texts: list[str]) -> torch.Tensor:
        """[B] reward-model scores of generated answers to the batch's prompts."""
        answers, ended = cut_at_stop(tokens, stop_token_ids(self.model, self.tokenizer))
        seqs = pack(prompt_ids(batch), answers, ended, self.tokenizer.pad_token_id, self.device).seqs
        return self.scorer(seqs["input_ids"], seqs["attention_mask"], seqs["loss_mask"]).float()
