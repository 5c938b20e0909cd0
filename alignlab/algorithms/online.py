"""What every online algorithm (PPO, GRPO; next RLOO, GKD, tool-calling rollouts) shares: it samples its
own answers, scores them, then takes several optimizer steps on them.

`OnlineModule` owns, once: the generation backend (synced to the policy before every rollout), keyed
sampling, the one reward-scoring path (`rewards_of`: reward functions, async ones concurrently, with
`completion_ids`, timing and checked values, plus a reward model's scores), the update's statistics
(alignlab.online.update_stats.UpdateStats), manual optimisation, the held-out evaluation by greedy
answers, and the sample tables. Its config gives `generation_backend`, `temperature`,
`num_sample_generations`, `micro_batch_size` and `max_tokens_per_micro_batch`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from omegaconf import DictConfig, OmegaConf

from alignlab.algorithms.base import AlignmentModule
from alignlab.data.vision import VISION_KEYS, select_vision
from alignlab.errors import ConfigError
from alignlab.losses.rollout_correction import ROLLOUT_CORRECTIONS, logprob_mismatch
from alignlab.online.backends import build_backend, check_backend_spec
from alignlab.online.micro_batches import token_budget_micro_batches
from alignlab.online.rewards import REWARD_FUNCTIONS, build_reward_function, check_reward_columns, score_completions
from alignlab.online.rollout import Samples, sample
from alignlab.online.samples import log_samples, sample_row, with_columns
from alignlab.online.update_stats import UpdateStats
from alignlab.online.vllm_backend import VLLM_MODES, build_vllm_backend, require_vllm
from alignlab.runner.checks import Checks


@dataclass
class GreedyEvaluation:
    """Greedy answers to held-out prompts, scored: what the evaluation and the sample tables read."""

    texts: list[str]  # [B] each answer's text, cut at the first stop token (multi-turn: its final answer)
    scores: torch.Tensor  # [B] the algorithm's score of each answer (eval_scores)
    rows: list[dict] = field(default_factory=list)  # [B] or []: more fields of each sample-table row
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)  # more eval metrics over the answers


class OnlineModule(AlignmentModule):
    """Base of the online algorithms. A subclass defines:

    - `train_on(batch, optimizer, scheduler) -> (metrics, rows)`: the algorithm as its paper writes it:
      rollout (`sample_answers`; log-probs by alignlab.online.rollout.token_logprobs) → rewards
      (`rewards_of`) → advantages → the clipped update, its rows cut by tokens (`micro_batches`; each
      forward cut to its own longest row, alignlab.data.collate.select_rows), its statistics kept in an
      UpdateStats (`update_metrics`), its optimizer steps by `optimizer_step_manually`;
    - `steps_per_rollout`: optimizer steps per rollout (trainer.max_steps counts optimizer steps);
    - `eval_scores(batch, tokens, texts)` and `eval_metric`: how it scores a greedy answer;
    - `counters` (with `rollout_counter` among them) and, with reward functions, `use_reward_functions`
      in its constructor (`rewards`, `weights`; its config's `reward_weights`).
    It may override `check_config` / `check_run` (calling these first) and `evaluate_greedy`.
    """

    # The attribute counting rollouts so far (one of `counters`, so a resumed run continues it): it keys
    # sampling and spaces the sample tables.
    rollout_counter: str = "rollouts"
    eval_metric: str  # eval/<eval_metric> is the mean of eval_scores over the held-out prompts

    def __init__(self, model, tokenizer, optim, evaluation=None, **hparams):
        super().__init__(model, tokenizer, optim, evaluation, **hparams)
        self.automatic_optimization = False  # several optimizer steps per rollout
        use_vllm = getattr(self, "use_vllm", False)  # vLLM as the engine: alignlab.online.vllm_backend
        self.backend = build_vllm_backend(hparams) if use_vllm else build_backend(self.generation_backend)

    # -- config ---------------------------------------------------------------------------------
    @classmethod
    def check_config(cls, algorithm: DictConfig) -> None:
        """The keys every online algorithm has: `temperature` > 0, `num_sample_generations` >= 0, a
        `generation_backend` that imports, `micro_batch_size` and `max_tokens_per_micro_batch` null or
        >= 1. A subclass checks its own keys after calling this. Raises ConfigError naming the key."""
        checks = Checks(algorithm, "algorithm").positive("temperature").at_least(0, "num_sample_generations")
        check_backend_spec(algorithm.generation_backend)
        for key in ("micro_batch_size", "max_tokens_per_micro_batch"):
            if algorithm[key] is not None:
                checks.at_least(1, key)
        if algorithm.get("use_vllm", False):
            cls.check_vllm_keys(algorithm, checks)

    # What one optimizer step trains on, for the message that refuses trainer.accumulate_grad_batches.
    step_rows: str = "one batch of batch_size rows"

    @classmethod
    def check_run(cls, cfg: DictConfig) -> None:
        """trainer.accumulate_grad_batches other than 1 is refused, naming what does its job here: an online
        algorithm takes its optimizer steps itself (manual optimisation, which Lightning does not accumulate
        for) and already cuts each step into micro-batches by algorithm.max_tokens_per_micro_batch and
        algorithm.micro_batch_size with the step's gradient unchanged, so a larger step is a larger
        batch_size. Raises ConfigError naming the keys."""
        accumulate = OmegaConf.select(cfg, "trainer.accumulate_grad_batches", default=1)
        if accumulate == 1:
            return
        batch = OmegaConf.select(cfg, "data.batch_size", default=None)
        larger = (
            f"batch_size={batch * accumulate}"
            if isinstance(batch, int) and isinstance(accumulate, int)
            else (f"batch_size × {accumulate}")
        )
        raise ConfigError(
            f"trainer.accumulate_grad_batches={accumulate} does not apply to algorithm={cfg.algorithm.name}, which "
            f"takes its optimizer steps itself: each trains on {cls.step_rows}, cut into micro-batches by "
            "algorithm.max_tokens_per_micro_batch (padded tokens) and algorithm.micro_batch_size (rows) with the "
            f"step's gradient unchanged. For {accumulate}× the rows per optimizer step set {larger} (memory stays "
            "bounded by those two keys) and leave trainer.accumulate_grad_batches=1"
        )

    @classmethod
    def check_rows(cls, algorithm: DictConfig, datamodule) -> None:
        """Every row has the columns `algorithm.reward_funcs` require (alignlab.online.rewards.
        check_reward_columns), in both splits, whatever the batch order. Raises DataError."""
        specs = algorithm.get("reward_funcs")
        if not specs:
            return
        # a reward-model folder needs no column (and is not loaded again for this)
        named = [
            spec for spec in OmegaConf.to_container(specs) if not isinstance(spec, str) or spec in REWARD_FUNCTIONS
        ]
        functions = [build_reward_function(spec) for spec in named]
        source = datamodule.source
        describe = getattr(source, "describe", lambda: type(source).__name__)()
        check_reward_columns(functions, datamodule.read(), getattr(source, "origin", lambda _: None), describe)

    @staticmethod
    def check_vllm_keys(algorithm: DictConfig, checks: Checks) -> None:
        """With use_vllm: the vllm_* keys in range (the correction mode one of ROLLOUT_CORRECTIONS' or the user's
        own function by dotted path, clip_min in [0, cap)), no other generation_backend, and vllm importable (else
        ConfigError naming the `vllm` extra)."""
        checks.one_of("vllm_mode", VLLM_MODES).positive("vllm_gpu_memory_utilization")
        checks.within("vllm_gpu_memory_utilization", 0.0, 1.0)
        checks.within("vllm_server_port", 1, 65535).positive("vllm_server_timeout", "vllm_importance_sampling_cap")
        checks.non_negative("vllm_sync_tolerance").registered(
            "vllm_importance_sampling_mode", ROLLOUT_CORRECTIONS, own=True
        )
        if algorithm.vllm_importance_sampling_clip_min is not None:  # C_min below C_max, as TRL
            checks.within(
                "vllm_importance_sampling_clip_min", 0.0, algorithm.vllm_importance_sampling_cap, high_open=True
            )
        if algorithm.generation_backend is not None:
            raise ConfigError(
                "algorithm.use_vllm=true samples with vLLM, and algorithm.generation_backend names another backend: "
                "set one of them (generation_backend=null)"
            )
        if algorithm.vllm_mode == "colocate":  # a server brings its own vLLM; this process only talks HTTP
            require_vllm()

    # -- the algorithm --------------------------------------------------------------------------
    rewards: Sequence[tuple[str, Callable]] = ()  # (name, function) scored by `rewards_of`
    weights: Sequence[float] = ()  # one per reward function

    def train_on(self, batch: dict, optimizer, scheduler) -> tuple[dict[str, torch.Tensor], int]:
        """One rollout of the batch's prompts and its optimizer steps: (train metrics, the rows they
        average over)."""
        raise NotImplementedError

    @property
    def steps_per_rollout(self) -> int:
        """Optimizer steps taken on each rollout (trainer.max_steps counts optimizer steps)."""
        raise NotImplementedError

    def eval_scores(self, batch: dict, tokens: torch.Tensor, texts: list[str]) -> torch.Tensor:
        """[B] the algorithm's score of greedy answers to the batch's prompts: `tokens` [B, ≤
        max_new_tokens] as generated, `texts` cut at the first stop token."""
        raise NotImplementedError

    # -- one rollout ----------------------------------------------------------------------------
    @torch.no_grad()
    def sample_answers(self, batch: dict, max_new_tokens: int, chunk: int, num_per_prompt: int = 1) -> Samples:
        """`num_per_prompt` answers to each of the batch's prompts at `temperature`, at most `chunk` at a
        time, by the generation backend (given the policy's current weights first). Sampling is keyed on
        (seed, rollouts so far, the batch's data rows): the same answers whatever the process count, and
        on resuming (alignlab.online.rollout.sample)."""
        self.backend.sync(self.model)
        samples = sample(
            self.model,
            self.tokenizer,
            batch,
            max_new_tokens,
            self.temperature,
            chunk,
            num_per_prompt=num_per_prompt,
            step=getattr(self, self.rollout_counter),
            backend=self.backend,
        )
        if hasattr(self.backend, "sleep"):  # a colocated engine may free its memory for the update
            self.backend.sleep()
        return samples

    # -- rewards: one scoring path for every online algorithm ----------------------------------------
    def use_reward_functions(self, functions: Sequence[tuple[str, Callable]]) -> None:
        """Score with `functions` ((name, callable), alignlab.online.rewards.build_reward_function), weighted
        by the config's `reward_weights` (null: 1.0 each)."""
        self.rewards = list(functions)
        self.weights = list(self.reward_weights) if self.reward_weights else [1.0] * len(self.rewards)

    def rewards_of(
        self,
        batch: dict,
        completions: list,
        completion_ids: list | None = None,
        model_scores: torch.Tensor | None = None,
        environment_rewards: list | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """([N] the completions' rewards, {name: [N] each reward function's values}).

        `completions`: G answers (text, or a multi-turn episode's messages) to each of the batch's prompts in
        consecutive rows; every function is called with the prompts' messages and the data's columns,
        repeated G times, `completion_ids` (their token ids, as TRL passes them) and a multi-turn episode's
        `environment_reward` (alignlab.online.rewards.score_completions: async functions concurrently,
        every value checked, naming the function and row). The reward is Σ_k w_k·f_k, plus
        `model_scores` ([N], a reward model's, PPO's) at weight 1; each function's seconds are logged
        (`log_reward_seconds`). Raises RewardFunctionError, ValueError for a count that is no multiple
        of the prompts'."""
        per_fn, total = {}, torch.zeros(len(completions), device=self.device)
        if self.rewards:
            columns = {"completion_ids": completion_ids, "environment_reward": environment_rewards}
            prompts, columns = self.reward_inputs(batch, len(completions), columns)
            scored, seconds = score_completions(self.rewards, prompts, completions, columns)
            for (name, _), weight in zip(self.rewards, self.weights):
                per_fn[name] = torch.tensor(scored[name], device=self.device)
                total += weight * per_fn[name]
            self.log_reward_seconds(seconds, len(completions))
        if model_scores is not None:
            total = model_scores + total if self.rewards else model_scores
        return total, per_fn

    @staticmethod
    def reward_inputs(batch: dict, count: int, given: dict) -> tuple[list, dict]:
        """(prompts, columns) for `count` completions, G to each of the batch's prompts: the prompts' message
        lists and the data's columns, each repeated G times, and the `given` columns that are not None."""
        prompts = batch["prompt_messages"]
        g, rest = divmod(count, len(prompts))
        if rest:
            raise ValueError(f"{count} completions for {len(prompts)} prompts: not G per prompt")
        columns = {k: [v for v in values for _ in range(g)] for k, values in batch.get("columns", {}).items()}
        return [p for p in prompts for _ in range(g)], columns | {k: v for k, v in given.items() if v is not None}

    def log_reward_seconds(self, seconds: dict[str, float], rows: int) -> None:
        """train/timing/reward/<name>: each reward function's seconds in this training step, summed over
        the step's calls (dynamic sampling's rounds); this process's own (no collective, however often a
        process scores); nothing outside training."""
        if self._trainer is None or not self.trainer.training:
            return
        step, spent = getattr(self, "_reward_seconds", (None, {}))
        spent = {k: (spent.get(k, 0.0) if step == self.global_step else 0.0) + v for k, v in seconds.items()}
        self._reward_seconds = (self.global_step, spent)
        for k, v in spent.items():
            name = f"timing/reward/{k}"
            self.log(f"train/{name}", v, on_step=True, on_epoch=False, batch_size=rows)

    def reward_metrics(self, per_fn: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """rewards/<name>/mean and rewards/<name>/std (TRL's names), the std over every device's
        completions (not a mean of the devices' stds)."""
        metrics = {}
        for name, values in per_fn.items():
            everyone = self.gather_across_devices(values)
            metrics[f"rewards/{name}/mean"], metrics[f"rewards/{name}/std"] = values.mean(), everyone.std()
        return metrics

    def update_metrics(self, stats: UpdateStats, names: dict[str, str] | None = None) -> dict[str, torch.Tensor]:
        """The update's statistics over every device (UpdateStats.reduce), under their logged `names`
        ({statistic: metric}, in that order; statistics not measured are left out), or their own."""
        values = stats.reduce(self.mean_across_devices)
        return values if names is None else {metric: values[k] for k, metric in names.items() if k in values}

    def rollout_correction(
        self, train_logprobs: torch.Tensor, samples: Samples, mask: torch.Tensor
    ) -> tuple[torch.Tensor | None, dict[str, torch.Tensor]]:
        """For answers an engine sampled (Samples.sampling_logprobs; else (None, {})): the importance weights
        [N, R] of the policy's log-probs at rollout time `train_logprobs` [N, R] against the engine's (with
        vllm_importance_sampling_correction, by vllm_importance_sampling_mode in [clip_min, cap]: alignlab.
        losses.rollout_correction; else None), and the metrics under TRL's names: the mismatch |log π_train −
        log π_vllm| (mean, max over `mask`'s tokens) and the weights' min, mean and max (over the tokens, or
        over the completions for a sequence mode, as TRL), with a mask mode also the share masked to 0."""
        if samples.sampling_logprobs is None:
            return None, {}
        train, engine = train_logprobs.detach().float(), samples.sampling_logprobs
        mean, most = logprob_mismatch(train, engine, mask)
        stats = {"sampling/sampling_logp_difference/mean": mean, "sampling/sampling_logp_difference/max": most}
        if not self.vllm_importance_sampling_correction:
            return None, stats
        mode = ROLLOUT_CORRECTIONS.resolve(self.vllm_importance_sampling_mode)
        weights = mode.fn(
            train, engine, mask, self.vllm_importance_sampling_cap, self.vllm_importance_sampling_clip_min
        )
        on_tokens = weights[:, 0] if mode.level == "sequence" else weights[mask > 0]
        if on_tokens.numel():
            stats["sampling/importance_sampling_ratio/min"] = on_tokens.min()
            stats["sampling/importance_sampling_ratio/mean"] = on_tokens.mean()
            stats["sampling/importance_sampling_ratio/max"] = on_tokens.max()
            if mode.masks:
                stats["sampling/importance_sampling_ratio/masked_fraction"] = (on_tokens == 0).float().mean()
        return weights.to(train_logprobs.dtype), stats

    def training_step(self, batch: dict, batch_idx: int) -> None:
        metrics, rows = self.train_on(batch, self.optimizers(), self.lr_schedulers())
        self._log("train", metrics, rows, on_step=True)
        # batch_idx restarts every pass over the prompts; this count does not
        rollouts = getattr(self, self.rollout_counter) + 1
        setattr(self, self.rollout_counter, rollouts)
        if self.sample_every and rollouts % self.sample_every == 0:
            self.log_sample_table()

    @property
    def sample_every(self) -> int:
        """Rollouts between sample tables, so that num_sample_generations tables span the run (0: none)."""
        if not self.num_sample_generations or self._trainer is None or self.trainer.max_steps <= 0:
            return 0
        rollouts = -(-self.trainer.max_steps // self.steps_per_rollout)
        return max(1, rollouts // self.num_sample_generations)

    # -- the update's micro-batches ----------------------------------------------------------------
    def micro_batches(self, attention_mask: torch.Tensor) -> list[torch.Tensor]:
        """One optimizer step's rows, given by their attention masks [N, T] (right-padded prompt +
        answer), cut into micro-batches of at most `max_tokens_per_micro_batch` padded tokens and
        `micro_batch_size` rows (alignlab.online.micro_batches.token_budget_micro_batches): a list of
        row positions [n_i] on the mask's device, every row once. The losses divide by the step's
        totals, so the step's gradient is the same however the rows are cut. Every process cuts its rows
        into as many micro-batches as the one that needs the most: DDP synchronises each backward."""
        lengths = attention_mask.sum(1).tolist()
        budget, cap = self.max_tokens_per_micro_batch, self.micro_batch_size
        cut = token_budget_micro_batches(lengths, budget, cap)
        most = int(self.gather_across_devices(torch.tensor([len(cut)], device=attention_mask.device)).max())
        if most > len(cut):
            cut = token_budget_micro_batches(lengths, budget, cap, count=most)
        return [torch.tensor(rows, device=attention_mask.device) for rows in cut]

    # -- evaluation -----------------------------------------------------------------------------
    def evaluate_greedy(self, batch: dict) -> GreedyEvaluation:
        """Greedy answers to the batch's prompts (`greedy_answers`), scored by `eval_scores`."""
        tokens, texts = self.greedy_answers(batch)
        return GreedyEvaluation(texts, self.eval_scores(batch, tokens, texts))

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        """Greedy answers to held-out prompts: eval/<eval_metric>, where measured exact_match, and what
        `evaluate_greedy` adds."""
        greedy = self.evaluate_greedy(batch)
        metrics = {self.eval_metric: greedy.scores.mean()}
        if self.measures_exact_match(batch):
            metrics["exact_match"] = self.exact_match(batch, greedy.texts).mean()
        self._log("eval", {**metrics, **greedy.metrics}, len(greedy.texts), on_step=False)

    def log_sample_table(self, n: int = 16) -> None:
        """The first `n` held-out prompts (message lists, as the data gave them), their greedy answers,
        each answer's eval_scores value as `score`, what `evaluate_greedy` adds to a row, and the data's
        extra columns, appended to <run>/samples.jsonl (and a W&B table; alignlab.online.samples)."""
        batch = self.held_out_prompts(n)
        greedy = self.evaluate_greedy(batch)
        more = greedy.rows or [{} for _ in greedy.texts]
        rows = [
            {**sample_row(p, a, s), **extra}
            for p, a, s, extra in zip(batch["prompt_messages"], greedy.texts, greedy.scores.tolist(), more)
        ]
        log_samples(self.trainer, with_columns(rows, batch.get("columns", {})))

    def held_out_prompts(self, n: int) -> dict:
        """The first `n` rows of the first held-out batch, tensors on this device, from the trainer's
        validation loader. Raises RuntimeError when the trainer has none (a run without held-out rows
        logs no sample tables: alignlab.train sets num_sample_generations to 0)."""
        loader = self.trainer.val_dataloaders
        if isinstance(loader, (list, tuple)):
            loader = loader[0] if loader else None
        if loader is None:
            raise RuntimeError("sample tables answer held-out prompts, and the trainer has no validation loader")
        batch = next(iter(loader))
        images = {k: v.to(self.device) for k, v in select_vision(batch, slice(0, n)).items()}  # the rows' own
        return {
            k: v[:n].to(self.device)
            if torch.is_tensor(v)
            else {c: x[:n] for c, x in v.items()}
            if isinstance(v, dict)
            else v[:n]
            for k, v in batch.items()
            if k not in VISION_KEYS
        } | images
