"""PPO for RLHF with four models: policy (trained), reference (frozen), reward model (frozen; or rule
rewards, `reward_funcs`, instead or besides) and value model (initialised from the reward model, or
from the policy when there is none; trained).

One training step = one rollout: sample answers to a batch of prompts, score them, turn scores and
per-token KL penalties into GAE advantages, then run `num_ppo_epochs` passes over
`num_mini_batches` mini-batches, one optimizer step each (Lightning manual optimisation). Sampling,
evaluation and sample tables: alignlab.algorithms.online.
"""

from __future__ import annotations

import copy

import torch
from omegaconf import DictConfig, OmegaConf

from alignlab.algorithms.online import OnlineModule
from alignlab.data.collate import select_rows
from alignlab.errors import ConfigError
from alignlab.losses.ppo import ppo_policy_loss, ppo_value_loss
from alignlab.losses.rlhf import (
    KL_ESTIMATES,
    adaptive_kl_coef,
    clip_scores,
    gae,
    kl_estimate,
    kl_loss_term,
    kl_penalty_rewards,
    masked_mean,
    masked_whiten,
)
from alignlab.models.compatible import check_ref_model
from alignlab.models.modes import disable_dropout
from alignlab.models.reference import Frozen
from alignlab.models.reward import VALUE_HEAD_FILE, RewardModel, is_reward_model_folder
from alignlab.online.generation import answer_texts, cut_at_stop, stop_token_ids
from alignlab.online.rewards import build_reward_function, check_reward_funcs
from alignlab.online.rollout import Samples, pack, prompt_ids, response_positions, token_logprobs
from alignlab.online.update_stats import UpdateStats
from alignlab.runner.checks import Checks, check_kl_loss


def load_reward_and_value_models(
    policy: torch.nn.Module, reward_model: str | None, value_model: str | None, dtype: torch.dtype
) -> tuple[RewardModel | None, RewardModel]:
    """(the reward model to score with, or None; the value model to train), all the folder reading PPO
    does. The value model: `value_model`'s folder, else `reward_model`'s, else, with rule rewards only,
    a copy of the starting policy (its LoRA adapter, if any, included) under a freshly initialised
    value head (OpenRLHF's critic defaults to the policy when there is no reward model to start from)."""
    if value_model or reward_model:
        value = RewardModel.from_pretrained(value_model or reward_model, dtype=dtype)
    else:
        value = RewardModel(copy.deepcopy(policy))
        value.value_head.to(dtype)
    scorer = RewardModel.from_pretrained(reward_model, dtype=dtype) if reward_model else None
    return scorer, value


def check_reward_model_folders(algorithm: DictConfig) -> None:
    """`reward_model` and `value_model`, where set, are reward-model folders; raises ConfigError naming the key."""
    for key in ("reward_model", "value_model"):
        folder = algorithm[key]
        if folder is not None and not is_reward_model_folder(folder):
            raise ConfigError(
                f"algorithm.{key}={folder} is not a reward-model folder (no {VALUE_HEAD_FILE}, nor a one-label "
                "AutoModelForSequenceClassification); train one with algorithm=rm and give its <run>/model folder"
            )


def score_clip_bounds(clip_range: float | list | None) -> tuple[float, float] | None:
    """`reward_clip_range` as (low, high): r gives (−r, r), [low, high] is OpenRLHF's form; None: no clipping."""
    if clip_range is None:
        return None
    if isinstance(clip_range, (int, float)):
        return -float(clip_range), float(clip_range)
    low, high = clip_range
    return float(low), float(high)


class PPO(OnlineModule):
    trains_on_images = False  # its value model does not read images yet: refused before training (alignlab.train)

    uses_reference = True
    step_rows = (
        "one mini-batch of batch_size / algorithm.num_mini_batches rows of a rollout of batch_size prompts "
        "(num_ppo_epochs × num_mini_batches steps per rollout)"
    )
    # current_kl_coef: β of the next rollout, which the adaptive controller (kl_target) moves
    counters = ("episodes", "rollouts", "current_kl_coef")

    def __init__(self, model, tokenizer, optim, evaluation=None, **hparams):
        super().__init__(model, tokenizer, optim, evaluation, **hparams)
        dtype = next(model.parameters()).dtype
        scorer, self.value = load_reward_and_value_models(model, self.reward_model, self.value_model, dtype)
        if self.disable_dropout:  # the value model trains beside the policy: the same setting
            disable_dropout(self.value)
        self.scorer = Frozen(scorer) if scorer is not None else None
        if self.scorer is not None:
            self.frozen.append(self.scorer)
        self.use_reward_functions([build_reward_function(spec) for spec in self.reward_funcs or []])
        self.episodes = 0  # prompts rolled out so far
        self.rollouts = 0
        self.current_kl_coef = self.kl_coef

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
        checks.non_negative("kl_coef", "vf_coef", "entropy_coef").positive("cliprange", "cliprange_value")
        checks.within("gamma", 0, 1).within("lam", 0, 1)
        checks.at_least(1, "num_ppo_epochs", "num_mini_batches", "local_rollout_forward_batch_size", "response_length")
        checks.registered("kl_estimator", KL_ESTIMATES).positive("kl_horizon")
        if algorithm.missing_eos_penalty is not None:
            checks.non_negative("missing_eos_penalty")
        if algorithm.kl_target is not None:
            # β only ever scales (adaptive_kl_coef), so a β of 0 would stay 0: the controller would do nothing.
            checks.positive("kl_target", "kl_coef")
        c = algorithm.dual_clip
        if c is not None and (isinstance(c, bool) or not isinstance(c, (int, float)) or not c > 1):
            raise ConfigError(f"algorithm.dual_clip must be null or a number > 1 (Ye et al. use 3), got {c!r}")
        cls.check_reward_clip_range(algorithm.reward_clip_range)
        check_kl_loss(algorithm, algorithm.use_kl_loss, "use_kl_loss=true")
        funcs = OmegaConf.to_container(algorithm.reward_funcs) if algorithm.reward_funcs is not None else []
        if algorithm.reward_model is None and not funcs:
            raise ConfigError(
                "algorithm=ppo needs a reward: set algorithm.reward_model (a reward-model folder, <rm run>/model) "
                "or algorithm.reward_funcs (rule rewards, e.g. [accuracy]), or both"
            )
        check_reward_funcs(funcs, algorithm.reward_weights)
        check_reward_model_folders(algorithm)

    @staticmethod
    def check_reward_clip_range(clip_range) -> None:
        """null, a number r > 0, or [low, high] with low < high; raises ConfigError naming the key."""
        if clip_range is None:
            return
        if OmegaConf.is_config(clip_range):
            clip_range = OmegaConf.to_container(clip_range)
        numbers = clip_range if isinstance(clip_range, list) else [clip_range]
        valid = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in numbers) and (
            (len(numbers) == 1 and not isinstance(clip_range, list) and clip_range > 0)
            or (isinstance(clip_range, list) and len(numbers) == 2 and numbers[0] < numbers[1])
        )
        if not valid:
            raise ConfigError(
                "algorithm.reward_clip_range must be null, a number r > 0 (scores clipped to [-r, r]) or "
                f"[low, high] with low < high, got {clip_range!r}"
            )

    @classmethod
    def check_run(cls, cfg: DictConfig) -> None:
        super().check_run(cfg)
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
        check_ref_model(cfg)

    # -- rollout --------------------------------------------------------------------------------
    @torch.no_grad()
    def rollout(self, batch: dict) -> dict:
        """Sample answers to a batch of left-padded prompts, score them and turn the scores and per-token
        KL penalties into GAE advantages: what the update trains on, and the rollout's metrics."""
        samples = self.sample_answers(batch, self.response_length, self.local_rollout_forward_batch_size)
        mask, has_eos = samples.mask, samples.has_eos
        logprobs, ref_logprobs, values, model_scores = self.forward_rollout(samples)
        rollout_weights, correction = self.rollout_correction(logprobs, samples, mask)  # an engine's samples only
        scores, reward_stats = self.score(batch, samples, model_scores)
        kl_coef = self.current_kl_coef
        advantages, returns, non_score_reward = self.advantages(logprobs, ref_logprobs, values, scores, mask)
        kl = (kl_estimate(logprobs, ref_logprobs, self.kl_estimator) * mask).sum(1)
        stats = {
            "objective/kl": kl.mean(),
            "objective/entropy": (-logprobs * mask).sum(1).mean(),
            "objective/non_score_reward": non_score_reward.sum(1).mean(),
            "objective/rlhf_reward": (scores + non_score_reward.sum(1)).mean(),
            "objective/scores": scores.mean(),
            "val/num_eos_tokens": has_eos.float().sum(),
            **reward_stats,
            **correction,
        }
        if self.kl_target is not None:
            stats["objective/kl_coef"] = torch.tensor(kl_coef, device=self.device)
        out = {
            **samples.seqs,
            "starts": samples.starts,
            "mask": mask,
            "logprobs": logprobs,
            "values": values,
            "advantages": advantages,
            "returns": returns,
            "scores": scores,  # [N] what entered the reward: penalised, clipped
            "stats": stats,
        }
        if self.use_kl_loss:
            out["ref_logprobs"] = ref_logprobs
        if rollout_weights is not None:
            out["rollout_weights"] = rollout_weights
        return out

    def forward_rollout(self, samples: Samples) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The sampled answers' token log-probs under the policy and the reference and the value model's
        values ([N, R] each, 0 past an answer's end), and the reward model's scores ([N], None without
        one), `local_rollout_forward_batch_size` rows at a time."""
        chunk, (n, length), mask = self.local_rollout_forward_batch_size, samples.mask.shape, samples.mask
        logprobs, ref_logprobs, values, scores = [], [], [], []
        for i in range(0, n, chunk):
            sub, at = {k: v[i : i + chunk] for k, v in samples.seqs.items()}, samples.starts[i : i + chunk]
            logprobs.append(token_logprobs(self.model, sub, at, length, self.temperature))
            ref_logprobs.append(token_logprobs(self.reference, sub, at, length, self.temperature))
            values.append(response_positions(self.value.values(sub["input_ids"], sub["attention_mask"]), at, length))
            if self.scorer is not None:
                scores.append(self.scorer(sub["input_ids"], sub["attention_mask"], sub["loss_mask"]))
        model_scores = torch.cat(scores).float() if self.scorer is not None else None
        return (
            torch.cat(logprobs) * mask,
            torch.cat(ref_logprobs) * mask,
            torch.cat(values).float() * mask,
            model_scores,
        )

    def score(
        self, batch: dict, samples: Samples, model_scores: torch.Tensor | None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """([N] each answer's score, the reward functions' metrics): the reward model's score at weight 1
        plus the weighted reward functions (OnlineModule.rewards_of, as GRPO scores), less
        missing_eos_penalty for an answer cut at the length limit, clipped to reward_clip_range."""
        texts = answer_texts(self.tokenizer, samples.responses, samples.has_eos)
        scores, per_fn = self.rewards_of(batch, texts, samples.responses, model_scores=model_scores)
        if self.missing_eos_penalty is not None:
            scores = scores - self.missing_eos_penalty * (~samples.has_eos).float()
        if self.reward_clip_range is not None:
            scores = clip_scores(scores, *score_clip_bounds(self.reward_clip_range))
        return scores, self.reward_metrics(per_fn)

    def advantages(
        self, logprobs: torch.Tensor, ref_logprobs: torch.Tensor, values: torch.Tensor, scores: torch.Tensor, mask
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(advantages, returns, the per-token KL penalty) [N, R]: the scores at each answer's last token
        less β·KL per token (or, with use_kl_loss, no KL here: it is a loss term of the update), whitened
        where asked, through GAE, the advantages whitened; statistics over the whole rollout, every device."""
        reward_kl_coef = 0.0 if self.use_kl_loss else self.current_kl_coef
        rewards, non_score_reward = kl_penalty_rewards(
            logprobs, ref_logprobs, scores, mask, reward_kl_coef, self.kl_estimator
        )
        total = self.sum_across_devices  # whitening statistics are the whole rollout's, on every device
        if self.whiten_rewards:
            rewards = masked_whiten(rewards, mask, shift_mean=False, total=total) * mask
        advantages, returns = gae(rewards, values, mask, self.gamma, self.lam)
        return masked_whiten(advantages, mask, total=total) * mask, returns, non_score_reward

    def update_kl_coef(self, rollout: dict) -> None:
        """With `kl_target`, the adaptive controller (Ziegler et al., 2019) sets β for the next rollout
        from this one's KL per answer and size, both over every process (so every process keeps one β)."""
        if self.kl_target is None:
            return
        kl = self.mean_across_devices(rollout["stats"]["objective/kl"])
        answers = self.sum_across_devices(torch.tensor(float(rollout["mask"].shape[0]), device=self.device))
        self.current_kl_coef = adaptive_kl_coef(
            self.current_kl_coef, float(kl), self.kl_target, self.kl_horizon, float(answers)
        )

    # -- update ---------------------------------------------------------------------------------
    # What ppo_update logs, by the UpdateStats names it keeps them under: each statistic's mean over the
    # optimizer steps of the step's token mean (a loss: the step's loss).
    update_metric_names = {
        "approxkl": "policy/approxkl_avg",
        "clipfrac": "policy/clipfrac_avg",
        "pg_loss": "loss/policy_avg",
        "vf_loss": "loss/value_avg",
        "vf_clipfrac": "val/clipfrac_avg",
        "entropy": "policy/entropy_avg",
        "ratio": "val/ratio",
        "kl_loss": "loss/kl_avg",  # with use_kl_loss
        "dual_clipfrac": "policy/dual_clipfrac_avg",  # with dual_clip
    }

    def ppo_update(self, rollout: dict, optimizer, scheduler=None, generator: torch.Generator | None = None) -> dict:
        """num_ppo_epochs × num_mini_batches optimizer steps; each mini-batch's gradient is accumulated
        over micro-batches (its rows cut by tokens, `micro_batches`; each forward cut to its own longest
        row) whose losses are normalised by the mini-batch's token count, so it equals the gradient of
        the whole mini-batch at once. Logged: each mini-batch's loss and token means, averaged over the
        mini-batches (the same however they are cut; `update_metric_names`)."""
        n = rollout["input_ids"].shape[0]
        mini = n // self.num_mini_batches
        stats = UpdateStats()
        for _ in range(self.num_ppo_epochs):
            order = torch.randperm(n, generator=generator).to(self.device)
            for start in range(0, n, mini):
                rows = order[start : start + mini]
                # Losses are normalised by the mini-batch's tokens on every device, so the gradients
                # DDP averages add up to the whole mini-batch's token mean.
                tokens = self.sum_across_devices(rollout["mask"][rows].sum())
                for positions in self.micro_batches(rollout["attention_mask"][rows]):
                    self.micro_batch_step(rollout, rows[positions], tokens, stats)
                self.optimizer_step_manually(optimizer, scheduler)
                stats.end_step()
        return self.update_metrics(stats, self.update_metric_names)

    def micro_batch_step(self, rollout: dict, idx: torch.Tensor, tokens: torch.Tensor, stats: UpdateStats) -> None:
        """The policy and value losses of the rollout's rows `idx` (normalised by the mini-batch's
        `tokens`), backpropagated, their statistics added to `stats`."""
        mask, starts, length = rollout["mask"][idx], rollout["starts"][idx], rollout["mask"].shape[1]
        sub = select_rows(rollout, idx)
        new_logprobs, entropy = token_logprobs(  # the entropy's gradient only for a bonus
            self.model, sub, starts, length, self.temperature, entropy=True, entropy_grad=self.entropy_coef > 0
        )
        new_logprobs = new_logprobs * mask
        vpred = response_positions(self.value.values(sub["input_ids"], sub["attention_mask"]), starts, length).float()
        kl = None
        if self.use_kl_loss:  # the KL to the reference as a loss term (verl), not in the reward
            ref, old = rollout["ref_logprobs"][idx] * mask, rollout["logprobs"][idx] * mask
            kl = kl_loss_term(new_logprobs, ref, old, self.kl_estimator, self.use_bias_correction_kl)
        policy = ppo_policy_loss(
            new_logprobs,
            rollout["logprobs"][idx],
            rollout["advantages"][idx],
            mask,
            self.cliprange,
            num_items_in_batch=tokens,
            scale=self.loss_scale(),
            dual_clip=self.dual_clip,
            entropy=entropy,
            entropy_coef=self.entropy_coef,
            kl=kl,
            kl_coef=self.current_kl_coef,
            rollout_weights=rollout["rollout_weights"][idx] if "rollout_weights" in rollout else None,
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
        self.backpropagate(policy.loss + self.vf_coef * vf_loss)
        entropy = masked_mean(entropy.detach(), mask)
        stats.add(mask.sum(), approxkl=policy.approxkl, clipfrac=policy.clipfrac, vf_clipfrac=vf_clipfrac)
        stats.add(mask.sum(), entropy=entropy, ratio=policy.ratio, dual_clipfrac=policy.dual_clipfrac)
        stats.add_shares(pg_loss=policy.pg_loss, vf_loss=vf_loss, kl_loss=policy.kl)  # shares of the step's loss

    def train_on(self, batch: dict, optimizer, scheduler) -> tuple[dict, int]:
        rollout = self.rollout(batch)
        self.episodes += rollout["input_ids"].shape[0]
        stats = self.ppo_update(rollout, optimizer, scheduler)
        self.update_kl_coef(rollout)  # after the update, which used this rollout's β (the loss term's too)
        metrics = {
            **rollout["stats"],
            **stats,
            "lr": torch.tensor(scheduler.get_last_lr()[0]),
            "episodes": torch.tensor(float(self.episodes)),
        }
        return metrics, rollout["input_ids"].shape[0]

    # -- evaluation: the score of greedy answers -------------------------------------------------
    eval_metric = "objective/scores"

    @torch.no_grad()
    def eval_scores(self, batch: dict, tokens: torch.Tensor | None, texts: list[str]) -> torch.Tensor:
        """[B] scores of generated answers to the batch's prompts: the reward model's plus the weighted
        reward functions (no missing-eos penalty, no clipping). `tokens` None (no reward model): the
        reward functions get the texts only, without `completion_ids`."""
        answers = model_scores = None
        if tokens is not None:
            answers, ended = cut_at_stop(tokens, stop_token_ids(self.model, self.tokenizer))
        if self.scorer is not None:
            seqs = pack(prompt_ids(batch), answers, ended, self.tokenizer.pad_token_id, self.device).seqs
            model_scores = self.scorer(seqs["input_ids"], seqs["attention_mask"], seqs["loss_mask"]).float()
        return self.rewards_of(batch, texts, answers, model_scores=model_scores)[0]
