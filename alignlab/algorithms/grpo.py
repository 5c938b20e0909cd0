"""GRPO (Shao et al., 2024): `num_generations` answers per prompt, advantages relative to the group,
a clipped token loss and an optional KL to a frozen reference. No value model.

One training step = one generation batch: `batch_size` prompts × `num_generations` completions,
sampled in one batched, KV-cached generate; then `num_iterations` optimizer steps on it. Sampling,
evaluation and sample tables: alignlab.algorithms.online.
"""

from __future__ import annotations

import functools
import logging

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

from alignlab.algorithms.multiturn import MultiTurnRollouts
from alignlab.algorithms.online import OnlineModule
from alignlab.data.collate import select_rows
from alignlab.data.vision import VISION_KEYS
from alignlab.errors import ConfigError
from alignlab.losses.grpo import (
    ADVANTAGES,
    GRPO_LOSSES,
    IMPORTANCE_RATIOS,
    SCALE_REWARDS,
    entropy_threshold,
    estimate_advantages,
    grpo_loss,
    high_entropy_mask,
    kl_reward_penalty,
)
from alignlab.losses.rlhf import KL_ESTIMATES
from alignlab.losses.rollout_correction import off_policy_sequence_mask
from alignlab.online.generation import answer_texts, cut_at_stop, stop_token_ids
from alignlab.online.rewards import build_reward_function, check_reward_funcs
from alignlab.online.rollout import Samples, pack, row_sampling_logprobs, token_logprobs
from alignlab.online.update_stats import UpdateStats
from alignlab.runner.checks import Checks, check_kl_loss

log = logging.getLogger(__name__)


class PromptDraws(L.Callback):
    """Hands GRPO the DataModule's prompt draw at fit start (dynamic sampling's replacement prompts), so
    the module never reaches into the trainer's DataModule itself."""

    def on_fit_start(self, trainer: L.Trainer, pl_module: GRPO) -> None:
        pl_module.prompt_draws = trainer.datamodule.draw_prompts


class GRPO(MultiTurnRollouts, OnlineModule):
    rollout_counter = "generation_batches"
    step_rows = "one generation batch of batch_size prompts × algorithm.num_generations completions"
    counters = ("generation_batches", "optimizer_steps")

    def __init__(self, model, tokenizer, optim, evaluation=None, **hparams):
        super().__init__(model, tokenizer, optim, evaluation, **hparams)
        self.use_reward_functions([self.bind_soft_overlong(build_reward_function(spec)) for spec in self.reward_funcs])
        if self.multi_turn:  # tools or an environment: episodes of several turns (alignlab.algorithms.multiturn)
            self.setup_multi_turn()
        self.generation_batches = 0
        self.optimizer_steps = 0  # counts steps for sync_ref_model
        self.run_warnings: list[str] = []  # what the run's summary repeats (watch_reward_signal)
        self.last_rollout_flat = False  # whether every group of the last rollout had equal rewards
        self._flat_counts = (0, 0, 0)  # (such rollouts in a row, such rollouts, rollouts) so far
        self._flat_rewards: list[float] = []  # the mean reward of each rollout of the current streak

    @property
    def uses_reference(self) -> bool:
        return self.beta != 0.0  # with beta 0 no reference model is loaded

    @property
    def loss_beta(self) -> float:
        """β of the KL term in the loss: 0 when the KL is a reward penalty instead (kl_in_reward)."""
        return 0.0 if self.kl_in_reward else self.beta

    @property
    def steps_per_rollout(self) -> int:
        return self.num_iterations

    # -- config ---------------------------------------------------------------------------------
    @classmethod
    def check_config(cls, algorithm: DictConfig) -> None:
        super().check_config(algorithm)
        checks = Checks(algorithm, "algorithm").at_least(2, "num_generations").positive("epsilon")
        checks.non_negative("beta").at_least(1, "num_iterations", "max_completion_length", "generation_chunk_size")
        checks.registered("loss_type", GRPO_LOSSES)
        if algorithm.epsilon_high is not None:
            checks.positive("epsilon_high")
        checks.registered("importance_sampling_level", IMPORTANCE_RATIOS)
        checks.positive("sapo_temperature_pos", "sapo_temperature_neg").non_negative("entropy_coef")
        checks.within("top_entropy_quantile", 0.0, 1.0)
        if algorithm.off_policy_mask_threshold is not None:
            checks.non_negative("off_policy_mask_threshold")
        if algorithm.loss_type == "cispo" and algorithm.epsilon_high is None:
            raise ConfigError(
                "algorithm.loss_type=cispo caps the importance weight at algorithm.epsilon_high itself (as TRL and "
                "ms-swift read it; ScaleRL uses 5.0): set it, null would cap at epsilon"
            )
        if algorithm.delta is not None:
            if GRPO_LOSSES[algorithm.loss_type].objective != "clipped":
                raise ConfigError(
                    "algorithm.delta (two-sided clipping) applies to the clipped loss types "
                    f"{GRPO_LOSSES.names(objective='clipped')}, "
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
        check_reward_funcs(funcs, algorithm.reward_weights)
        cls.check_multi_turn_keys(algorithm)
        cls.check_advantage_and_reference_keys(algorithm, checks, funcs)

    @staticmethod
    def check_advantage_and_reference_keys(algorithm: DictConfig, checks: Checks, funcs: list) -> None:
        """Advantage estimators, KL in the reward, dynamic sampling, soft overlong and reference syncs."""
        if algorithm.scale_rewards is not None:
            checks.one_of("scale_rewards", SCALE_REWARDS)
        checks.registered("advantage_estimator", ADVANTAGES, own=True).at_least(0, "max_resample_times")
        checks.registered("kl_estimator", KL_ESTIMATES)
        for key in ("kl_in_reward", "sync_ref_model"):
            if algorithm[key] and algorithm.beta == 0:
                raise ConfigError(
                    f"algorithm.{key}=true needs a reference model, and algorithm.beta=0 loads none: "
                    f"set algorithm.beta > 0 or algorithm.{key}=false"
                )
        check_kl_loss(algorithm, algorithm.beta != 0 and not algorithm.kl_in_reward, "beta > 0, kl_in_reward=false")
        if "soft_overlong" in funcs:
            if algorithm.soft_cache_length is None:
                raise ConfigError("the soft_overlong reward needs algorithm.soft_cache_length (and soft_max_length)")
            if algorithm.soft_max_length is not None:
                checks.at_least(1, "soft_max_length")
            longest = algorithm.soft_max_length or algorithm.max_completion_length
            checks.within("soft_cache_length", 1, longest)

    @classmethod
    def check_run(cls, cfg: DictConfig) -> None:
        super().check_run(cfg)
        completions = cfg.data.batch_size * cfg.algorithm.num_generations
        micro = cfg.algorithm.micro_batch_size
        if micro is not None and completions % micro:
            raise ConfigError(
                f"each step generates batch_size × algorithm.num_generations = {cfg.data.batch_size} × "
                f"{cfg.algorithm.num_generations} = {completions} completions, which algorithm.micro_batch_size "
                f"({micro}) must divide"
            )
        cls.check_sync_ref_model(cfg)
        cls.check_episode_setup(cfg)

    # -- generation and rewards -----------------------------------------------------------------
    @torch.no_grad()
    def generate_batch(self, batch: dict) -> dict:
        """One generation batch: num_generations completions to each of the batch's prompts, scored
        (`sample_and_score`; with dynamic_sample, groups without signal replaced: `dynamic_sampling`),
        their log-probs at rollout time (`rollout_logprobs`), and group-relative advantages of the rewards
        (less β·KL per completion with kl_in_reward): what grpo_update trains on, and its metrics."""
        g = self.num_generations
        samples, texts, rewards, per_fn = self.sample_and_score(batch)
        first_zero_std = (rewards.view(-1, g).std(1) < 1e-6).float().mean()  # of the first sample, as DAPO reports it
        extra = dict(samples.metrics)  # the first sample's episodes (multi-turn), as the line above
        if self.dynamic_sample:
            samples, texts, rewards, per_fn, resamples = self.dynamic_sampling(batch, samples, texts, rewards, per_fn)
            extra["num_resamples"] = torch.tensor(float(resamples), device=self.device)
        mask = samples.mask
        if self.mask_truncated_completions:  # answers cut at the length limit teach nothing
            mask = mask * samples.has_eos.unsqueeze(1).float()
        old, ref, rollout_weights, correction = self.rollout_logprobs(samples, mask)
        inputs = {"lengths": samples.mask.sum(1), "logprobs": old, "mask": mask}  # what estimators read besides rewards
        extra |= correction
        returns = rewards
        if self.kl_in_reward:  # each token's reward −β·k1, summed into the completion's return
            penalty, extra["kl"] = kl_reward_penalty(old * mask, ref * mask, mask, self.beta)
            returns = rewards - penalty
            old = old if self.num_iterations > 1 else None  # one iteration: the update's ratio is exactly 1
        everyone = self.gather_across_devices(returns)
        advantages = estimate_advantages(returns, g, self.advantage_estimator, self.scale_rewards, everyone, **inputs)
        self.last_rollout_flat = bool((rewards.view(-1, g).std(1) < 1e-6).all())  # what train_on watches
        return {
            **samples.seqs,
            "starts": samples.starts,
            "mask": mask,
            "advantages": advantages,
            "old_logprobs": old,
            "ref_logprobs": ref,
            "rollout_weights": rollout_weights,
            "sampling_logprobs": samples.sampling_logprobs,  # the engine's (None without one): the off-policy mask's
            "stats": self.generation_stats(samples, rewards, per_fn, first_zero_std, extra),
            "texts": texts,
        }

    def rollout_logprobs(self, samples: Samples, mask: torch.Tensor) -> tuple:
        """(old, ref, rollout_weights, correction metrics): the policy's token log-probs [N, R] at rollout
        time where the update needs them (num_iterations > 1, kl_in_reward; else None: the ratio is then
        exactly 1) or an engine sampled (compared with the engine's: `rollout_correction`), and the
        reference's [N, R] (None without a reference); neither masked."""
        length = mask.shape[1]
        old = ref = None
        engine = samples.sampling_logprobs is not None  # an engine sampled: compare its log-probs with the policy's
        if self.num_iterations > 1 or self.kl_in_reward or engine:  # later iterations (and k1) need them too
            old = token_logprobs(self.model, samples.seqs, samples.starts, length, self.temperature)
        rollout_weights, correction = self.rollout_correction(old, samples, mask) if engine else (None, {})
        if engine and not (self.num_iterations > 1 or self.kl_in_reward):
            old = None  # one iteration: the update's ratio stays exactly 1, as without an engine
        if self.reference is not None:
            ref = token_logprobs(self.reference, samples.seqs, samples.starts, length, self.temperature)
        return old, ref, rollout_weights, correction

    def generation_stats(
        self, samples: Samples, rewards: torch.Tensor, per_fn: dict, first_zero_std: torch.Tensor, extra: dict
    ) -> dict[str, torch.Tensor]:
        """The generation batch's metrics: reward, its std within groups, frac_reward_zero_std (of the first
        sample), `extra`, completion lengths and clipped share, each reward function's mean and std."""
        return {
            "reward": rewards.mean(),
            "reward_std": rewards.view(-1, self.num_generations).std(1).mean(),
            "frac_reward_zero_std": first_zero_std,
            **extra,
            "completions/mean_length": samples.mask.sum(1).mean(),
            "completions/clipped_ratio": 1 - samples.has_eos.float().mean(),
            **self.reward_metrics(per_fn),
        }

    def sample_and_score(self, batch: dict) -> tuple:
        """num_generations answers to each of the batch's prompts and their rewards: (Samples, texts,
        weighted rewards [N], per-function rewards {name: [N]}); multi-turn, the texts are the episodes'
        conversations, scored with each episode's environment reward."""
        g = self.num_generations
        if self.multi_turn:  # completions are conversations: the turns after the prompt, as message lists
            episodes = self.sample_episodes(batch, g)
            samples, texts = episodes.samples, episodes.conversations
            rewards, per_fn = self.rewards_of(batch, texts, samples.responses, environment_rewards=episodes.rewards)
            return samples, texts, rewards, per_fn
        samples = self.sample_answers(batch, self.max_completion_length, self.generation_chunk_size, g)
        texts = answer_texts(self.tokenizer, samples.responses, samples.has_eos)
        rewards, per_fn = self.rewards_of(batch, texts, samples.responses)
        return samples, texts, rewards, per_fn

    # -- DAPO dynamic sampling ------------------------------------------------------------------
    def dynamic_sampling(self, batch: dict, samples, texts: list[str], rewards: torch.Tensor, per_fn: dict) -> tuple:
        """DAPO's dynamic sampling (Yu et al., 2025, §3.2), with ms-swift's `dynamic_sample` and
        `max_resample_times`: a group whose G rewards are all equal (std < 1e-6) gives no gradient under a
        group baseline, so up to max_resample_times more rounds of batch_size freshly drawn training prompts
        (`draw_prompts`) are sampled and scored while groups with signal are short (`resample`); the batch
        is then the first batch_size groups with signal, in the order found, and, if still short after the
        last round, the first sample's zero-variance groups fill it, so it always keeps batch_size groups.
        ms-swift instead falls back to the whole first sample when short; this keeps what the rounds found.
        Under DDP every process runs as many rounds (while any is short) and fills its own share.

        Returns (Samples, texts, rewards [N], per-function rewards, rounds run); the inputs unchanged when
        every group of the first sample has signal. Raises ValueError for prompts with images."""
        g, size = self.num_generations, len(batch["index"])
        if any(k in batch for k in VISION_KEYS):
            raise ValueError("dynamic_sample does not yet handle prompts with images")
        pieces = [(samples, texts, rewards, per_fn)]
        rounds = self.resample(batch, pieces)
        signal = [piece[2].view(-1, g).std(1) >= 1e-6 for piece in pieces]
        if len(pieces) == 1 and bool(signal[0].all()):
            return samples, texts, rewards, per_fn, rounds
        chosen = [(p, i) for p, has in enumerate(signal) for i in range(len(has)) if has[i]][:size]
        flat = [(0, i) for i in range(size) if (0, i) not in chosen]
        chosen += flat[: size - len(chosen)]  # the first sample's zero-variance groups, when nothing better was found
        return (*self.gathered(pieces, [(p, i * g + j) for p, i in chosen for j in range(g)]), rounds)

    def resample(self, batch: dict, pieces: list[tuple]) -> int:
        """Dynamic sampling's rounds: while any process has fewer than batch_size groups with signal in
        `pieces` (each sample_and_score's result), and rounds and training rows are left, a fresh draw
        of batch_size prompts, not yet used in this step, is sampled, scored and appended. Returns the
        rounds run."""
        g, size = self.num_generations, len(batch["index"])
        exclude = set(self.gather_across_devices(batch["index"].to(self.device)).tolist())
        rounds = 0
        while True:
            kept = sum(int((piece[2].view(-1, g).std(1) >= 1e-6).sum()) for piece in pieces)
            short = self.gather_across_devices(torch.tensor([size - kept], device=self.device)).max().item()
            if short <= 0 or rounds >= self.max_resample_times:
                return rounds
            more = self.draw_prompts(size, rounds, exclude)
            if more is None:  # the training rows ran out
                return rounds
            exclude |= set(self.gather_across_devices(more["index"].to(self.device)).tolist())
            pieces.append(self.sample_and_score(more))
            rounds += 1

    def gathered(self, pieces: list[tuple], rows: list[tuple[int, int]]) -> tuple:
        """(Samples, texts, rewards [N], per-function rewards) of the `rows` ((piece, row) pairs) of
        `pieces`, packed again: each row keeps its trained tokens as sampled (a multi-turn episode's tool
        results stay out of the loss) and an engine's sampling log-probs."""
        pick = lambda k: [getattr(pieces[p][0], k)[r] for p, r in rows]  # noqa: E731
        masks = [pieces[p][0].mask[r, : len(pieces[p][0].responses[r])] for p, r in rows]
        engine_logps = None
        if pieces[0][0].sampling_logprobs is not None:
            engine_logps = [row_sampling_logprobs(pieces[p][0], r) for p, r in rows]
        packed = pack(
            pick("prompts"),
            pick("responses"),
            torch.stack(pick("has_eos")),
            self.tokenizer.pad_token_id,
            self.device,
            sampling_logprobs=engine_logps,
            masks=masks,
        )
        texts = [pieces[p][1][r] for p, r in rows]
        rewards = torch.stack([pieces[p][2][r] for p, r in rows])
        per_fn = {name: torch.stack([pieces[p][3][name][r] for p, r in rows]) for name in pieces[0][3]}
        return packed, texts, rewards, per_fn

    # Set at fit start by PromptDraws: the DataModule's `draw_prompts` (dynamic sampling's extra prompts).
    prompt_draws = None

    def configure_callbacks(self) -> list[L.Callback]:
        return [*super().configure_callbacks(), *([PromptDraws()] if self.dynamic_sample else [])]

    def draw_prompts(self, count: int, round_: int, exclude: set[int]) -> dict | None:
        """`count` more training prompts for this process, as a training batch on this device: a seeded draw
        keyed on (seed, rollouts so far, `round_`) of rows not in `exclude` (the step's rows so far, so no
        prompt's sampling keys repeat within a step), the same on every process, which takes its own slice
        of count × world rows (alignlab.data.datamodule.PromptDataModule.draw_prompts). None when fewer
        rows are left."""
        if self.prompt_draws is None:
            raise RuntimeError("dynamic sampling draws prompts from a PromptDataModule: fit with datamodule=...")
        seed = hash((torch.initial_seed(), getattr(self, self.rollout_counter), round_)) & (2**63 - 1)
        drawn = self.prompt_draws(count, seed, exclude, self.trainer.world_size, self.global_rank)
        return None if drawn is None else {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in drawn.items()}

    # -- reward functions with options from this config ----------------------------------------
    def bind_soft_overlong(self, named: tuple) -> tuple:
        """The registry's `soft_overlong` with algorithm.soft_max_length (null: max_completion_length) and
        algorithm.soft_cache_length bound, as ms-swift configures it; any other function unchanged."""
        name, fn = named
        if name != "soft_overlong":
            return named
        longest = self.max_completion_length if self.soft_max_length is None else self.soft_max_length
        return name, functools.partial(fn, soft_max_length=longest, soft_cache_length=self.soft_cache_length)

    # -- the reference follows the policy (sync_ref_model) ------------------------------------------
    def optimizer_step_manually(self, optimizer, scheduler=None) -> None:
        """One optimizer step, then, every ref_model_sync_steps steps with sync_ref_model, the reference
        becomes α·policy + (1 − α)·reference (TR-DPO, Gorbatovski et al., 2024; TRL's SyncRefModelCallback)."""
        super().optimizer_step_manually(optimizer, scheduler)
        self.sync_reference()

    # -- update ---------------------------------------------------------------------------------
    def grpo_update(self, gen: dict, optimizer, scheduler=None) -> dict:
        """num_iterations optimizer steps on one generation batch, each accumulated over micro-batches
        (the completions cut by tokens, `micro_batches`; each forward cut to its own longest row).
        Every loss_type divides by the step's totals over every device (completion tokens, or
        completions), so each step equals one pass over the whole generation batch on one process.
        With top_entropy_quantile < 1 each step first finds its high-entropy tokens among all its
        completion tokens (`high_entropy_tokens`, one more forward pass without gradients). Logged: each
        step's token means over every device (clip shares over what they count: tokens, or completions
        with sequence-level ratios) and its loss, averaged over the steps (UpdateStats)."""
        n = gen["input_ids"].shape[0]
        tokens = self.sum_across_devices(gen["mask"].sum())
        completions = self.sum_across_devices(torch.tensor(float(n), device=gen["mask"].device))
        clip_keys = {"clip_ratio/low_mean": "clip_low", "clip_ratio/high_mean": "clip_high"}  # as TRL logs them
        if GRPO_LOSSES[self.loss_type].objective != "clipped":  # cispo's own share; sapo has no clip
            clip_keys = {"cispo_clip_ratio": "cispo_clip"} if self.loss_type == "cispo" else {}
        stats = UpdateStats()
        micro_batches = self.micro_batches(gen["attention_mask"])
        for _ in range(self.num_iterations):
            keep = None  # found again each step: the policy, and so its entropy, has changed
            if self.top_entropy_quantile < 1.0:
                keep = self.high_entropy_tokens(gen, micro_batches)
            for idx in micro_batches:
                out = self.micro_batch_loss(gen, idx, tokens, completions, keep)
                self.backpropagate(out.loss)
                kl = out.kl if self.loss_beta != 0.0 else None  # no KL term in the loss: none logged here
                stats.add(gen["mask"][idx].sum(), kl=kl, entropy=out.entropy)
                stats.add(out.clip_units, **{key: getattr(out, name) for key, name in clip_keys.items()})
                stats.add_shares(loss=out.loss)  # the loss whose gradient the step took
            self.optimizer_step_manually(optimizer, scheduler)
            stats.end_step()
        out = self.update_metrics(stats)
        if GRPO_LOSSES[self.loss_type].objective == "clipped":
            out["clip_ratio/region_mean"] = out["clip_ratio/low_mean"] + out["clip_ratio/high_mean"]
        return out

    def micro_batch_loss(
        self, gen: dict, idx: torch.Tensor, tokens: torch.Tensor, completions: torch.Tensor, keep
    ) -> tuple:
        """grpo_loss's output (GRPOLossOutput) for the generation batch's rows `idx`, divided by the step's
        `tokens` and `completions` over every device; `keep`: the step's high-entropy tokens [N, R]
        (top_entropy_quantile), or None."""
        mask, length = gen["mask"][idx], gen["mask"].shape[1]
        # Past a completion's end, a row cut shorter than the batch reads other positions than at
        # generation time: zero every log-prob there, so the ratio and the KL are exactly 1 and 0.
        logprobs, entropy = token_logprobs(
            self.model,
            select_rows(gen, idx),
            gen["starts"][idx],
            length,
            self.temperature,
            entropy=True,
            entropy_grad=self.entropy_coef != 0.0,  # the entropy enters the loss: it carries gradients
        )
        logprobs, entropy = logprobs * mask, entropy * mask
        old = logprobs.detach() if gen["old_logprobs"] is None else gen["old_logprobs"][idx] * mask
        ref = None if gen["ref_logprobs"] is None else gen["ref_logprobs"][idx] * mask
        return grpo_loss(
            logprobs,
            old,
            gen["advantages"][idx],
            mask,
            self.epsilon,
            self.epsilon_high,
            self.loss_beta,
            ref,
            self.loss_type,
            self.max_completion_length,
            num_items_in_batch=tokens,
            num_completions=completions,
            scale=self.loss_scale(),  # DDP averages the devices' gradients
            importance_sampling_level=self.importance_sampling_level,
            delta=self.delta,
            sapo_temperature_pos=self.sapo_temperature_pos,
            sapo_temperature_neg=self.sapo_temperature_neg,
            entropy=entropy,
            entropy_coef=self.entropy_coef,
            entropy_mask=None if keep is None else keep[idx],
            rollout_weights=self.policy_weights(gen, idx, logprobs, old, mask),
            kl_estimator=self.kl_estimator,
            use_bias_correction_kl=self.use_bias_correction_kl,
        )

    def policy_weights(
        self, gen: dict, idx: torch.Tensor, logprobs: torch.Tensor, old: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor | None:
        """[N, R] the rows `idx`' weights on the policy term (None: 1): the engine's importance weights
        (rollout_correction) times, with off_policy_mask_threshold δ, DeepSeek-V3.2's off-policy sequence
        mask (alignlab.losses.rollout_correction.off_policy_sequence_mask, as TRL: each step's current
        log-probs `logprobs` against the engine's, or against π_old `old` without an engine)."""
        weights = None if gen.get("rollout_weights") is None else gen["rollout_weights"][idx]
        if self.off_policy_mask_threshold is None:
            return weights
        behaviour = old if gen.get("sampling_logprobs") is None else gen["sampling_logprobs"][idx]
        keep = off_policy_sequence_mask(
            gen["advantages"][idx], logprobs, behaviour, mask, self.off_policy_mask_threshold
        )
        return keep if weights is None else weights * keep.to(weights.dtype)

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
        self.watch_reward_signal(self.last_rollout_flat, gen["stats"]["reward"])
        stats = self.grpo_update(gen, optimizer, scheduler)
        return {**gen["stats"], **stats}, gen["input_ids"].shape[0]

    # -- a run that earns no reward signal says so ----------------------------------------------------
    # Rollouts in a row whose every group has equal rewards before the run warns (once, and in the summary).
    flat_rollouts_warning: int = 5

    def watch_reward_signal(self, flat: bool, reward: torch.Tensor) -> None:
        """Count the rollouts in which every group's completions got the same reward, over every process
        (then every advantage is 0, so the policy loss and its gradient are 0: the weights move only by any
        KL term), and warn once when `flat_rollouts_warning` come in a row, saying what usually causes it;
        the warning goes into `run_warnings`, which the run's summary prints. `on_train_end` looks again
        at the run's end (a run shorter than that)."""
        both = self.mean_across_devices(torch.stack([torch.tensor(float(flat), device=self.device), reward.float()]))
        flat_everywhere, mean = both[0].item() == 1.0, both[1].item()  # one collective for the two
        streak, total, seen = self._flat_counts
        if flat_everywhere:
            self._flat_rewards = (self._flat_rewards if streak else []) + [mean]
        self._flat_counts = (streak + 1 if flat_everywhere else 0, total + flat_everywhere, seen + 1)
        if self._flat_counts[0] >= self.flat_rollouts_warning and not self.run_warnings:
            self.warn_no_reward_signal(self._flat_counts[0])

    def warn_no_reward_signal(self, rollouts: int) -> None:
        rewards = sorted(set(round(r, 6) for r in self._flat_rewards))
        said = f"mean reward {rewards[0]:g}" if len(rewards) == 1 else f"mean rewards {rewards[0]:g} to {rewards[-1]:g}"
        message = (
            f"GRPO: in {rollouts} rollouts in a row every group of {self.num_generations} completions got the same "
            f"reward ({said}; train/frac_reward_zero_std = 1), so every advantage and the policy loss are 0 and only "
            "a KL term moves the weights: the run learns nothing from its rewards. Usual causes: the model never "
            "answers right (or always does): an easier task, a stronger starting model or a longer "
            "algorithm.max_completion_length; a reward that cannot match what the model writes (compare samples.jsonl "
            "with the data's solutions); a column the reward reads that the rows lack"
        )
        if self._trainer is None or self.trainer.is_global_zero:  # every process counts alike; one says it
            log.warning("%s", message)
        self.run_warnings.append(message)

    def on_train_end(self) -> None:
        """A run too short for the in-run warning whose every rollout (2 or more) had no reward signal
        says so too."""
        _, total, seen = self._flat_counts
        if not self.run_warnings and seen >= 2 and total == seen:
            self.warn_no_reward_signal(seen)

    # -- evaluation: the reward functions on one greedy answer per held-out prompt ------------------
    eval_metric = "reward"

    def eval_scores(self, batch: dict, tokens: torch.Tensor, texts: list[str]) -> torch.Tensor:
        """[B] the weighted reward of each greedy answer (its token ids, cut at the first stop token, passed
        on). Multi-turn, the greedy episodes are scored by MultiTurnRollouts.evaluate_greedy."""
        answers, _ = cut_at_stop(tokens, stop_token_ids(self.model, self.tokenizer))
        return self.rewards_of(batch, texts, answers)[0]
