"""Multi-turn, tool-calling rollouts for an online algorithm (GRPO): `MultiTurnRollouts`, a mixin over
OnlineModule that samples whole episodes (alignlab.online.multiturn) where the algorithm would sample
one answer, when its config lists `tools` or an `environment`.

It owns: the tools (loaded once, their JSON schemas passed to the chat template), the call format
(`tool_call_format`, or what the template writes), one environment per episode, the keyed sampling of
every turn by the generation backend, the episodes' Samples (mask 1 on the policy's tokens only) and
their metrics, and the greedy episodes of the held-out evaluation (exact match of the final answer).
The algorithm's loss, KL and entropy then read the mask as they read a single answer's.
"""

from __future__ import annotations

from dataclasses import replace
from typing import NamedTuple

import torch
from omegaconf import DictConfig, OmegaConf

from alignlab.algorithms.online import GreedyEvaluation
from alignlab.data.vision import VISION_KEYS
from alignlab.errors import ConfigError
from alignlab.online.generation import sample_keys, stop_token_ids
from alignlab.online.multiturn import (
    Episode,
    EpisodeSetup,
    check_row_tools,
    conversation,
    environment_factory,
    episode_metrics,
    episode_samples,
    episode_setup,
    greedy_sampler,
    on_final_answers,
    open_episodes,
    run_episodes,
)
from alignlab.online.rewards import REWARD_FUNCTIONS
from alignlab.online.rollout import Samples
from alignlab.online.tools import TOOL_CALL_FORMATS, load_tools, tool_schema
from alignlab.runner.checks import Checks


class EpisodeRollout(NamedTuple):
    """Episodes sampled for a batch's prompts (`MultiTurnRollouts.sample_episodes`), as values."""

    samples: Samples  # the episodes' tokens (mask 1 on the policy's only); `metrics`: episode_metrics
    conversations: list[list[dict]]  # each episode's messages after the prompt, as reward functions get them
    episodes: list[Episode]

    @property
    def rewards(self) -> list:
        """The reward each episode's environment gave at its end (None where it gave none)."""
        return [e.reward for e in self.episodes]


class MultiTurnRollouts:
    """Mixin, before OnlineModule, for an online algorithm whose completions may be episodes of several
    turns: multi-turn is on when the config's `tools` or `environment` is set.

    The host class must provide:
    - config keys as attributes: `tools`, `tool_call_format`, `tool_timeout`, `environment`, `max_turns`,
      `max_completion_length`, `generation_chunk_size`, `temperature`;
    - OnlineModule's `model`, `tokenizer`, `device`, `backend`, `rollout_counter`, `rewards` (the reward
      functions, (name, callable) pairs, set before `setup_multi_turn`), `rewards_of`, `eval_metric`,
      `evaluate_greedy`, `greedy_answers`, `check_rows`;
    and call `setup_multi_turn()` in its constructor when `multi_turn`, `check_multi_turn_keys` in
    `check_config` and `check_episode_setup` in `check_run`. It samples with `sample_episodes` where it
    would sample single answers, and scores an EpisodeRollout's `conversations` with its `rewards`
    (the environment's) as `environment_reward`. State passes as values: nothing sampled is kept on
    the module.
    """

    @property
    def multi_turn(self) -> bool:
        return bool(self.tools) or self.environment is not None

    @classmethod
    def check_multi_turn_keys(cls, algorithm: DictConfig) -> None:
        """`max_turns` >= 1, `tool_timeout` null or > 0, `tool_call_format` null or known, every tool
        importable and describable, the environment importable with reset and step. Raises ConfigError
        naming the key."""
        checks = Checks(algorithm, "algorithm").at_least(1, "max_turns")
        if algorithm.tool_timeout is not None:
            checks.positive("tool_timeout")
        if algorithm.tool_call_format is not None:
            checks.one_of("tool_call_format", TOOL_CALL_FORMATS)
        tools = OmegaConf.to_container(algorithm.tools) if algorithm.tools is not None else []
        if not isinstance(tools, list):
            raise ConfigError(f"algorithm.tools must be a list of dotted paths, got {tools!r}")
        loaded = load_tools(tools)
        if algorithm.environment is not None:
            environment_factory(algorithm.environment, loaded, algorithm.tool_call_format, algorithm.tool_timeout)

    @classmethod
    def check_episode_setup(cls, cfg: DictConfig) -> None:
        """With tools: the call format is known and the chat template writes tool results, checked on the
        policy's tokenizer before anything is written (alignlab.online.multiturn.episode_setup).
        Raises ConfigError naming the key."""
        algorithm = cfg.algorithm
        if not algorithm.tools:
            return
        from alignlab.models.loading import prepare_tokenizer, resolve_model_path

        tokenizer = prepare_tokenizer(resolve_model_path(cfg.model), cfg.model, algorithm.requires_chat_template)[0]
        episode_setup(
            algorithm.tools, algorithm.tool_call_format, algorithm.tool_timeout, algorithm.environment, tokenizer
        )

    @classmethod
    def check_rows(cls, algorithm: DictConfig, datamodule) -> None:
        """The online checks (reward columns), and with tools: every read row's own `tools` names only
        tools an episode runs (alignlab.online.multiturn.check_row_tools), checked after the data is read,
        before any model loads or anything is written (a stream's first rows, those it checks when it
        opens; later ones as they are met). Raises DataError or ConfigError naming the row."""
        super().check_rows(algorithm, datamodule)
        if not algorithm.get("tools") or algorithm.get("environment") is not None:
            return
        setup = EpisodeSetup([], [tool_schema(t) for t in load_tools(list(algorithm.tools))], None)
        origin = getattr(datamodule.source, "origin", None)
        describe = getattr(datamodule.source, "describe", lambda: "data")()
        for split, rows in datamodule.read().items():
            if not isinstance(rows, list):  # a stream: the rows it checked when it opened, its first ones
                rows = getattr(rows, "head", [])
            check_row_tools(setup, rows, f"{describe} ({split} split)", origin)

    def setup_multi_turn(self) -> None:
        """Load the tools and resolve the call format (from the tokenizer's template when not configured);
        registry reward functions then read a conversation's final answer."""
        setup = episode_setup(self.tools, self.tool_call_format, self.tool_timeout, self.environment, self.tokenizer)
        self.episode_setup = setup
        self.tool_functions, self.tool_schemas, self.new_environment = setup[:3]
        self.rewards = [(name, on_final_answers(fn) if name in REWARD_FUNCTIONS else fn) for name, fn in self.rewards]

    # -- sampling ------------------------------------------------------------------------------
    def episodes_for(self, batch: dict, num_per_prompt: int) -> list[Episode]:
        """`num_per_prompt` fresh episodes per row of the batch (alignlab.online.multiturn.open_episodes)."""
        columns = batch.get("columns", {})
        return open_episodes(batch["prompt_messages"], columns, num_per_prompt, self.episode_setup, self.tokenizer)

    @torch.no_grad()
    def sample_episodes(self, batch: dict, num_per_prompt: int, greedy: bool = False) -> EpisodeRollout:
        """Episodes for the batch's prompts, sampled by the generation backend with keys on (seed, rollouts
        so far, data row, sample, turn), or greedily (held-out evaluation); their Samples carry the
        episodes' metrics (episode_metrics). Raises ValueError for prompts with images."""
        if any(k in batch for k in VISION_KEYS):
            raise ValueError("multi-turn rollouts do not yet handle prompts with images")
        stops, pad = stop_token_ids(self.model, self.tokenizer), self.tokenizer.pad_token_id
        episodes = self.episodes_for(batch, num_per_prompt)
        if greedy:
            keys, sampler = None, greedy_sampler(self.model, self.tokenizer, stops)
        else:
            self.backend.sync(self.model)
            step = getattr(self, self.rollout_counter)
            keys = sample_keys(torch.initial_seed(), step, batch["index"], num_per_prompt)

            def sampler(ids, attn, n, max_new, turn_keys):
                # an engine's Sampled keeps its log-probs per turn: the rollout correction covers every turn
                return self.backend.sample(self.model, ids, attn, n, max_new, self.temperature, turn_keys, stops, pad)

        group, chunk = 1 if greedy else num_per_prompt, self.generation_chunk_size
        limits = (self.max_turns, self.max_completion_length)
        run_episodes(sampler, self.tokenizer, episodes, group, *limits, stops, chunk, keys, self.device)
        metrics = {k: torch.tensor(v, device=self.device) for k, v in episode_metrics(episodes, self.max_turns).items()}
        samples = replace(episode_samples(episodes, pad, self.device), metrics=metrics)
        return EpisodeRollout(samples, [conversation(e) for e in episodes], episodes)

    def greedy_answers(self, batch: dict) -> tuple[torch.Tensor, list[str]]:
        """Single-turn: the base class's. Multi-turn: greedy episodes: (every episode's tokens after the
        prompt [B, ≤ max_completion_length], right-padded, their final answers)."""
        if not self.multi_turn:
            return super().greedy_answers(batch)
        rollout = self.sample_episodes(batch, 1, greedy=True)
        samples = rollout.samples
        width = samples.mask.shape[1]
        tokens = torch.full((len(samples.responses), width), self.tokenizer.pad_token_id, device=self.device)
        for i, r in enumerate(samples.responses):
            tokens[i, : len(r)] = torch.tensor(r, device=self.device)
        return tokens, [e.final_answer for e in rollout.episodes]

    def evaluate_greedy(self, batch: dict) -> GreedyEvaluation:
        """Single-turn: the base class's. Multi-turn: greedy episodes scored by the reward functions (each
        episode's messages and token ids after the prompt, its environment reward); each sample-table row
        also gets `conversation` (the messages, tool results included), while `answer` stays the last
        assistant turn; the metrics: the episodes' (num_turns, tools/call_frequency,
        tools/failure_frequency, max_turns_ratio) and each reward function's mean (rewards/<fn>/mean; a
        weight of 0 makes a function a measurement)."""
        if not self.multi_turn:
            return super().evaluate_greedy(batch)
        rollout = self.sample_episodes(batch, 1, greedy=True)
        messages, ids = [e.messages for e in rollout.episodes], [e.ids for e in rollout.episodes]
        scores, per_fn = self.rewards_of(batch, messages, ids, environment_rewards=rollout.rewards)
        means = {f"rewards/{name}/mean": values.mean() for name, values in per_fn.items()}
        return GreedyEvaluation(
            [e.final_answer for e in rollout.episodes],
            scores,
            rows=[{"conversation": c} for c in rollout.conversations],
            metrics={**rollout.samples.metrics, **means},
        )
