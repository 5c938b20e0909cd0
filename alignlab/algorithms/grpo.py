"""GRPO (Shao et al., 2024): `num_generations` answers per prompt, advantages relative to the group,
a clipped token loss and an optional KL to a frozen reference. No value model.

One training step = one generation batch: `batch_size` prompts × `num_generations` completions,
sampled in one batched, KV-cached generate; then `num_iterations` optimizer steps on it. Sampling,
evaluation and sample tables: alignlab.algorithms.online.
"""

from __future__ import annotations

import torch
from omegaconf import DictConfig, OmegaConf

from alignlab.algorithms.online import OnlineModule
from alignlab.data.collate import select_rows
from alignlab.errors import ConfigError
from alignlab.losses.grpo import (
    CLIP_LOSS_TYPES,
    GRPO_LOSS_TYPES,
    IMPORTANCE_SAMPLING_LEVELS,
    SCALE_REWARDS,
    entropy_threshold,
    group_advantages,
    grpo_loss,
    high_entropy_mask,
)
from alignlab.online.generation import answer_texts
from alignlab.online.rewards import build_reward_function, call_reward_function
from alignlab.online.rollout import token_logprobs
from alignlab.runner.checks import Checks


class GRPO(OnlineModule):
    rollout_counter = "generation_batches"
    counters = ("generation_batches",)

    def __init__(self, model, tokenizer, optim, evaluation=None, **hparams):
        super().__init__(model, tokenizer, optim, evaluation, **hparams)
        self.rewards = [build_reward_function(spec) for spec in self.reward_funcs]
        self.weights = list(self.reward_weights) if self.reward_weights else [1.0] * len(self.rewards)
        self.generation_batches = 0

    @property
    def uses_reference(self) -> bool:
        return self.beta != 0.0  # with beta 0 no reference model is loaded

    @property
    def steps_per_rollout(self) -> int:
        return self.num_iterations

    # -- config ---------------------------------------------------------------------------------
    @classmethod
    def check_config(cls, algorithm: DictConfig) -> None:
        super().check_config(algorithm)
        checks = Checks(algorithm, "algorithm").at_least(2, "num_generations").positive("epsilon")
        checks.non_negative("beta").at_least(1, "num_iterations", "max_completion_length", "generation_chunk_size")
        checks.one_of("loss_type", GRPO_LOSS_TYPES).one_of("scale_rewards", SCALE_REWARDS)
        if algorithm.epsilon_high is not None:
            checks.positive("epsilon_high")
        checks.one_of("importance_sampling_level", IMPORTANCE_SAMPLING_LEVELS)
        checks.positive("sapo_temperature_pos", "sapo_temperature_neg").non_negative("entropy_coef")
        checks.within("top_entropy_quantile", 0.0, 1.0)
        if algorithm.loss_type == "cispo" and algorithm.epsilon_high is None:
            raise ConfigError(
                "algorithm.loss_type=cispo caps the importance weight at algorithm.epsilon_high itself (as TRL and "
                "ms-swift read it; ScaleRL uses 5.0): set it, null would cap at epsilon"
            )
        if algorithm.delta is not None:
            if algorithm.loss_type not in CLIP_LOSS_TYPES:
                raise ConfigError(
                    f"algorithm.delta (two-sided clipping) applies to the clipped loss types {CLIP_LOSS_TYPES}, "
                    f"not loss_type={algorithm.loss_type}: set it to null"
                )
            high = algorithm.epsilon if algorithm.epsilon_high is None else algorithm.epsilon_high
            checks.positive("delta")
            if not algorithm.delta > 1 + high:
                raise ConfigError(
                    f"algorithm.delta must be > 1 + epsilon_high = {1 + high} (so it caps only the ratios of "
                    f"negative-advantage tokens), got {algorithm.delta!r}"
                )
        funcs = OmegaConf.to_container(algorithm.reward_funcs)
        if not funcs:
            raise ConfigError("algorithm.reward_funcs must name at least one reward function")
        if algorithm.reward_weights is not None and len(algorithm.reward_weights) != len(funcs):
            raise ConfigError(
                f"algorithm.reward_weights has {len(algorithm.reward_weights)} weights for "
                f"{len(funcs)} reward functions"
            )
        for spec in funcs:  # unknown names and unimportable targets fail here, before any model loads
            build_reward_function(spec)

    @classmethod
    def check_run(cls, cfg: DictConfig) -> None:
        completions = cfg.data.batch_size * cfg.algorithm.num_generations
        micro = cfg.algorithm.micro_batch_size
        if micro is not None and completions % micro:
            raise ConfigError(
                f"each step generates batch_size × algorithm.num_generations = {cfg.data.batch_size} × "
                f"{cfg.algorithm.num_generations} = {completions} completions, which algorithm.micro_batch_size "
                f"({micro}) must divide"
            )

    # -- generation and rewards -----------------------------------------------------------------
    def rewards_of(self, batch: dict, texts: list[str], g: int | None = None) -> tuple[torch.Tensor, dict]:
        """Weighted sum of every reward function: [N], plus per-function values for metrics. `texts`:
        `g` answers to each of the batch's prompts in consecutive rows (default num_generations)."""
        g = self.num_generations if g is None else g
        prompts = [p for p in batch["prompt_messages"] for _ in range(g)]  # message lists, as the data gave them
        columns = {k: [v for v in values for _ in range(g)] for k, values in batch.get("columns", {}).items()}
        per_fn, total = {}, torch.zeros(len(texts), device=self.device)
        for (name, fn), weight in zip(self.rewards, self.weights):
            values = torch.tensor(call_reward_function(name, fn, prompts, texts, columns), device=self.device)
            per_fn[name] = values
            total += weight * values
        return total, per_fn

    @torch.no_grad()
    def generate_batch(self, batch: dict) -> dict:
        g = self.num_generations
        samples = self.sample_answers(batch, self.max_completion_length, self.generation_chunk_size, g)
        texts = answer_texts(self.tokenizer, samples.responses, samples.has_eos)
        rewards, per_fn = self.rewards_of(batch, texts)
        advantages = group_advantages(rewards, g, self.scale_rewards, batch_rewards=self.gather_across_devices(rewards))
        mask = samples.mask
        if self.mask_truncated_completions:  # answers cut at the length limit teach nothing
            mask = mask * samples.has_eos.unsqueeze(1).float()
        length = mask.shape[1]
        old = ref = None
        if self.num_iterations > 1:  # later iterations need the log-probs at generation time
            old = token_logprobs(self.model, samples.seqs, samples.starts, length, self.temperature)
        if self.reference is not None:
            ref = token_logprobs(self.reference, samples.seqs, samples.starts, length, self.temperature)
        grouped_std = rewards.view(-1, g).std(1)
        stats = {
            "reward": rewards.mean(),
            "reward_std": grouped_std.mean(),
            "frac_reward_zero_std": (grouped_std < 1e-6).float().mean(),
            "completions/mean_length": samples.mask.sum(1).mean(),
            "completions/clipped_ratio": 1 - samples.has_eos.float().mean(),
        }
        for name, values in per_fn.items():
            everyone = self.gather_across_devices(values)  # the std of the whole batch, not a mean of stds
            stats[f"rewards/{name}/mean"], stats[f"rewards/{name}/std"] = values.mean(), everyone.std()
        return {
            **samples.seqs,
            "starts": samples.starts,
            "mask": mask,
            "advantages": advantages,
            "old_logprobs": old,
            "ref_logprobs": ref,
            "stats": stats,
            "texts": texts,
        }

    # -- update ---------------------------------------------------------------------------------
    def grpo_update(self, gen: dict, optimizer, scheduler=None) -> dict:
        """num_iterations optimizer steps on one generation batch, each accumulated over micro-batches
        (the completions cut by tokens, `micro_batches`; each forward cut to its own longest row).
        Every loss_type divides by the step's totals over every device (completion tokens, or
        completions), so each step equals one pass over the whole generation batch on one process.
        With top_entropy_quantile < 1 each step first finds its high-entropy tokens among all its
        completion tokens (`high_entropy_tokens`, one more forward pass without gradients)."""
        n, length = gen["input_ids"].shape[0], gen["mask"].shape[1]
        tokens = self.sum_across_devices(gen["mask"].sum())
        completions = self.sum_across_devices(torch.tensor(float(n), device=gen["mask"].device))
        scale = self.loss_scale()  # DDP averages the devices' gradients
        # Token-weighted sums over every micro-batch and iteration, turned into token means at the end
        # (over all devices' tokens, so the logged value is the whole batch's). Clip shares are weighted
        # by what they count: tokens, or completions with sequence-level ratios.
        clip_keys = {"clip_ratio/low_mean": "clip_low", "clip_ratio/high_mean": "clip_high"}  # as TRL logs them
        if self.loss_type not in CLIP_LOSS_TYPES:  # cispo's own share; sapo has no clip
            clip_keys = {"cispo_clip_ratio": "cispo_clip"} if self.loss_type == "cispo" else {}
        sums, clip_sums = {"kl": 0.0, "entropy": 0.0}, dict.fromkeys(clip_keys, 0.0)
        counted, units, applied = 0.0, 0.0, 0.0  # applied: the loss whose gradient each optimizer step took, summed
        bonus = self.entropy_coef != 0.0  # the entropy enters the loss: it carries gradients
        micro_batches = self.micro_batches(gen["attention_mask"])
        for _ in range(self.num_iterations):
            keep = None  # found again each step: the policy, and so its entropy, has changed
            if self.top_entropy_quantile < 1.0:
                keep = self.high_entropy_tokens(gen, micro_batches)
            for idx in micro_batches:
                mask = gen["mask"][idx]
                # Past a completion's end, a row cut shorter than the batch reads other positions than at
                # generation time: zero every log-prob there, so the ratio and the KL are exactly 1 and 0.
                logprobs, entropy = token_logprobs(
                    self.model,
                    select_rows(gen, idx),
                    gen["starts"][idx],
                    length,
                    self.temperature,
                    entropy=True,
                    entropy_grad=bonus,
                )
                logprobs, entropy = logprobs * mask, entropy * mask
                old = logprobs.detach() if gen["old_logprobs"] is None else gen["old_logprobs"][idx] * mask
                ref = None if gen["ref_logprobs"] is None else gen["ref_logprobs"][idx] * mask
                out = grpo_loss(
                    logprobs,
                    old,
                    gen["advantages"][idx],
                    mask,
                    self.epsilon,
                    self.epsilon_high,
                    self.beta,
                    ref,
                    self.loss_type,
                    self.max_completion_length,
                    num_items_in_batch=tokens,
                    num_completions=completions,
                    scale=scale,
                    importance_sampling_level=self.importance_sampling_level,
                    delta=self.delta,
                    sapo_temperature_pos=self.sapo_temperature_pos,
                    sapo_temperature_neg=self.sapo_temperature_neg,
                    entropy=entropy,
                    entropy_coef=self.entropy_coef,
                    entropy_mask=None if keep is None else keep[idx],
                )
                loss = out.loss
                self.backpropagate(loss)
                applied = applied + loss.detach()
                n_tokens = mask.sum()
                counted, units = counted + n_tokens, units + out.clip_units
                for key in clip_sums:
                    clip_sums[key] = clip_sums[key] + getattr(out, clip_keys[key]) * out.clip_units
                sums["entropy"] = sums["entropy"] + out.entropy * n_tokens
                if out.kl is not None:
                    sums["kl"] = sums["kl"] + out.kl.detach() * n_tokens
            self.optimizer_step_manually(optimizer, scheduler)
        total = self.mean_across_devices(counted).clamp(min=1)  # means of both sides: their ratio is the sums'
        out = {k: self.mean_across_devices(v) / total for k, v in sums.items() if k != "kl" or self.beta != 0.0}
        total_units = self.mean_across_devices(units).clamp(min=1)
        out.update({k: self.mean_across_devices(v) / total_units for k, v in clip_sums.items()})
        if self.loss_type in CLIP_LOSS_TYPES:
            out["clip_ratio/region_mean"] = out["clip_ratio/low_mean"] + out["clip_ratio/high_mean"]
        out["loss"] = self.mean_across_devices(applied) / self.num_iterations  # the steps' losses, averaged
        return out

    @torch.no_grad()
    def high_entropy_tokens(self, gen: dict, micro_batches: list[torch.Tensor]) -> torch.Tensor:
        """[N, R] 1 on the completion tokens whose entropy under the policy is among the
        top_entropy_quantile share of this optimizer step's tokens, over every micro-batch and device
        (alignlab.losses.grpo.entropy_threshold): the same tokens whatever the micro-batching. TRL takes
        the quantile over each micro-batch's tokens on every process; the same when a step is one
        micro-batch."""
        mask, length = gen["mask"], gen["mask"].shape[1]
        # [N, max_completion_length] so that every device's rows have one width; −1 (an entropy is
        # >= 0) where there is no token
        entropy = torch.full((mask.shape[0], self.max_completion_length), -1.0, device=mask.device)
        for idx in micro_batches:
            _, values = token_logprobs(
                self.model, select_rows(gen, idx), gen["starts"][idx], length, self.temperature, entropy=True
            )
            entropy[idx, :length] = torch.where(mask[idx] > 0, values.float(), -1.0)
        everyone = self.gather_across_devices(entropy)
        threshold = entropy_threshold(everyone, everyone >= 0, self.top_entropy_quantile)
        return high_entropy_mask(entropy[:, :length], mask, threshold)

    def train_on(self, batch: dict, optimizer, scheduler) -> tuple[dict, int]:
        gen = self.generate_batch(batch)
        stats = self.grpo_update(gen, optimizer, scheduler)
        return {**gen["stats"], **stats}, gen["input_ids"].shape[0]

    # -- evaluation: the reward functions on one greedy answer per held-out prompt ------------------
    eval_metric = "reward"

    def eval_scores(self, batch: dict, tokens: torch.Tensor, texts: list[str]) -> torch.Tensor:
        """[B] the weighted reward of each greedy answer."""
        return self.rewards_of(batch, texts, g=1)[0]
