"""Measure a trained model on a data set's held-out split and write a small JSON report.

    python -m alignlab.evaluate --model outputs/dpo/<run>/model data=arith_pairs
    python -m alignlab.evaluate --model <run>/model --ref-model <sft>/model data=custom_pairs data.source.path=p.jsonl
    python -m alignlab.evaluate --model <run>/model --reward-model <rm run>/model data=arith_sft --output report.json

The words after the options are Hydra overrides, composed as `python -m alignlab` composes them
(alignlab.runner.config.compose): `data=` picks the data set, `eval_batch_size`, `max_length`,
`evaluation.max_new_tokens`, `model.dtype` and the data's own keys apply. The held-out split is the
one training validates on, so give the data overrides the training run had. What is measured
depends on what the data and the options give:

- `exact_match`: the share of greedy answers equal to the row's `solution` (any data kind with that
  column, e.g. the bundled arithmetic task), as training's eval/exact_match counts it.
- pairwise data, `preference_accuracy`: the share of pairs with log π(chosen) > log π(rejected) (sums
  over answer tokens: the model's own preference, its implicit reward without a reference).
- with `--ref-model`, `implicit_reward_accuracy`: the share with (log π − log π_ref)(chosen) >
  (log π − log π_ref)(rejected), DPO's implicit reward (training's rewards/accuracies), and
  `chosen_logratio`: the mean of log π(chosen) − log π_ref(chosen) over pairs (nats; per answer
  token: `chosen_logratio_per_token`), how far the model has moved from the reference on the data's
  chosen answers. KL-style, not a KL: the answers are the data's, not samples of either model.
- with tools or an environment in the overrides (`algorithm=grpo 'algorithm.tools=[...]'`, as the run
  had them; docs/tools.md), greedy multi-turn episodes instead of single answers, of up to
  `algorithm.max_turns` turns and `algorithm.max_completion_length` tokens: `exact_match` of the final
  answer, `num_turns`, `tools/call_frequency`, `tools/failure_frequency` and `max_turns_ratio` as GRPO's
  evaluation logs them, `tool_result_matches` (the share of episodes with a tool result equal to the
  row's `solution`) and, from an environment that gives one, the mean `environment_reward`.
- with `--reward-model`, `win_rate`: the share of prompts whose greedy answer the reward model scores
  above the baseline answer (a tie counts one half): the data's `chosen` (pairwise) or `completion`
  (SFT) answer, or `--baseline-model`'s greedy answer.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from alignlab.generate import answer_batch, complete, load_policy

if TYPE_CHECKING:
    from omegaconf import DictConfig

    from alignlab.data.datamodule import AlignmentDataModule

__all__ = ["build_parser", "evaluate", "held_out_data", "main"]

# The data's own answer a model's answer is compared with under a reward model, by data kind.
BASELINE_COLUMN = {"pairwise": "chosen", "sft": "completion"}


def _share(hits: list[float]) -> float | None:
    return sum(hits) / len(hits) if hits else None


def held_out_data(overrides: Sequence[str]) -> tuple[DictConfig, AlignmentDataModule]:
    """(config, DataModule) for `overrides`: the DataModule built as training builds it, its rows read
    and checked (no tokenizer yet), its eval batches set to carry each row's prompt messages and
    answers as text (a reward model reads text in its own tokenizer; a baseline model encodes the
    prompts with its own).

    Raises:
        ConfigError: the overrides do not compose, or leave a data key unset. DataError: bad data, or
            no held-out rows.
    """
    from hydra.errors import HydraException
    from omegaconf import OmegaConf

    from alignlab.data.mixture import build_datamodule
    from alignlab.errors import ConfigError, DataError
    from alignlab.runner.config import compose

    try:
        cfg = compose(list(overrides))
    except HydraException as e:
        raise ConfigError(f"the overrides {list(overrides)} do not compose: {e}") from None
    missing = OmegaConf.missing_keys(cfg.data)  # full keys: data.source.path
    if cfg.data.get("sources"):  # a mixture's specs give the paths
        missing.discard("data.source.path")
    if missing:
        raise ConfigError(f"required config value(s) not set: {', '.join(sorted(missing))}")
    datamodule = build_datamodule(cfg.data)
    datamodule.passthrough = (*datamodule.passthrough, "prompt", *BASELINE_COLUMN.values())
    if not datamodule.read().get("eval"):
        describe = getattr(datamodule.source, "describe", lambda: type(datamodule.source).__name__)()
        raise DataError(
            describe,
            "has no held-out rows to evaluate on; give data.source.eval_path, or hold rows out with "
            "data.source.eval_fraction > 0",
        )
    return cfg, datamodule


@torch.no_grad()
def evaluate(
    model_folder: str,
    overrides: Sequence[str] = (),
    ref_model: str | None = None,
    reward_model: str | None = None,
    baseline_model: str | None = None,
    device: str | torch.device = "cpu",
) -> dict:
    """The report (see the module docstring) for the model in `model_folder` on the held-out split of
    the data `overrides` compose to.

    Raises:
        ConfigError: overrides that do not compose, a required data key not set, a win rate without a
            baseline. DataError: bad data, or no held-out rows. ModelLoadError: a folder without a model.
    """
    from alignlab.models.reward import RewardScorer

    cfg, datamodule = held_out_data(overrides)
    multi_turn = check_options(cfg, datamodule.kind, ref_model, reward_model, baseline_model)  # before any model loads
    model, tokenizer = load_policy(model_folder, device, cfg.model)
    set_up_data(datamodule, model, tokenizer, model_folder)
    reference = load_reference(model, tokenizer, model_folder, ref_model, device)
    scorer = RewardScorer(reward_model, device, cfg.eval_batch_size) if reward_model else None
    baseline = load_policy(baseline_model, device, cfg.model) if baseline_model else None

    if multi_turn:
        metrics, counts = episode_report(model, tokenizer, datamodule, cfg.algorithm, device)
        return report(model_folder, None, None, None, list(overrides), cfg, datamodule, metrics, counts)
    judges, tally = Judges(model, tokenizer, reference, scorer, baseline, cfg.evaluation.max_new_tokens), Tally()
    for batch in datamodule.val_dataloader():
        tally.add_batch(judges, batch, datamodule, device)
    metrics, counts = tally.metrics()
    baseline_name = (baseline_model or BASELINE_COLUMN[datamodule.kind]) if reward_model else None
    return report(
        model_folder, ref_model, reward_model, baseline_name, list(overrides), cfg, datamodule, metrics, counts
    )


def check_options(cfg, kind: str, ref_model, reward_model, baseline_model) -> bool:
    """Whether the run measures multi-turn episodes (tools or an environment in cfg.algorithm), after
    refusing the options that do not fit the data or the episodes. Loads no model.

    Raises:
        ConfigError: a multi-turn key wrong, --reward-model or --ref-model with episodes, or a win
            rate without answers to compare with.
    """
    from alignlab.errors import ConfigError

    multi_turn = bool(cfg.algorithm.get("tools")) or cfg.algorithm.get("environment") is not None
    if multi_turn:
        from alignlab.algorithms.multiturn import MultiTurnRollouts

        MultiTurnRollouts.check_multi_turn_keys(cfg.algorithm)
        if reward_model or ref_model:
            raise ConfigError(
                "with tools or an environment, alignlab.evaluate measures multi-turn episodes "
                "(exact match, tool metrics); --reward-model and --ref-model are for single answers"
            )
    if reward_model and not baseline_model and kind not in BASELINE_COLUMN:
        raise ConfigError(
            f"a win rate compares the model's answers with other answers, and {kind} data has none: give "
            "--baseline-model <folder>, or pairwise (chosen) or SFT (completion) data"
        )
    return multi_turn


def set_up_data(datamodule, model, tokenizer, model_folder) -> None:
    """Encode the held-out rows for the loaded policy, as training does: its tokenizer, its image
    encoder (a vision-language model's), its positions as the longest max_length."""
    from alignlab.data.truncation import model_positions
    from alignlab.models.vision import load_image_encoder

    datamodule.set_tokenizer(tokenizer)
    datamodule.set_image_encoder(load_image_encoder(model, tokenizer, model_folder))
    datamodule.set_max_positions(model_positions(model.config))
    datamodule.setup()


def load_reference(model, tokenizer, model_folder, ref_model: str | None, device):
    """The --ref-model as a ReferenceModel on `device` (None without one).

    Raises:
        ConfigError: its vocabulary is smaller than the policy's tokenizer.
    """
    from alignlab.errors import ConfigError
    from alignlab.models.reference import ReferenceModel

    if not ref_model:
        return None
    reference = ReferenceModel.of(model, ref_model).to(torch.device(device))
    if reference.copy.get_input_embeddings().num_embeddings < len(tokenizer):
        raise ConfigError(
            f"--ref-model {ref_model} has a smaller vocabulary than {model_folder}'s tokenizer; the "
            "reference must share the policy's tokenizer (e.g. the model the run started from)"
        )
    return reference


@dataclass
class Judges:
    """What single answers are measured with: the policy, the optional reference, reward scorer and
    baseline (model, tokenizer), and the longest greedy answer."""

    model: Any
    tokenizer: Any
    reference: Any
    scorer: Any
    baseline: tuple | None
    max_new_tokens: int


@dataclass
class Tally:
    """Per-row results of single-answer evaluation, summed into the report's metrics at the end."""

    matched: list[float] = field(default_factory=list)  # exact match of each answer with a solution
    preferred: list[float] = field(default_factory=list)  # log π(chosen) > log π(rejected), per pair
    implicit: list[float] = field(default_factory=list)  # the same for log π − log π_ref
    logratios: list[float] = field(default_factory=list)  # log π(chosen) − log π_ref(chosen), per pair
    wins: list[float] = field(default_factory=list)  # 1 win, 0.5 tie, 0 loss under the reward model
    ratio_tokens: float = 0.0  # chosen answer tokens behind `logratios`

    def add_batch(self, judges: Judges, batch: dict, datamodule, device) -> None:
        """Measure one held-out batch: greedy answers where a solution or a reward model needs them,
        log-probs for pairwise data, the reward model's verdicts."""
        from lightning.fabric.utilities.apply_func import move_data_to_device

        batch = move_data_to_device(batch, torch.device(device))
        solutions = batch.get("solution")
        answers = None
        if judges.scorer is not None or (solutions and any(s is not None for s in solutions)):
            answers = greedy_answers(judges, batch)
        if answers is not None and solutions:
            self.add_matches(answers, solutions)
        if datamodule.kind == "pairwise":
            self.add_preferences(judges, batch)
        if judges.scorer is not None:
            self.add_wins(judges, batch, answers, datamodule)

    def add_matches(self, answers: list[str], solutions: list) -> None:
        from alignlab.online.generation import exact_match

        given = [i for i, s in enumerate(solutions) if s is not None]  # a row without one is not counted
        self.matched += exact_match([answers[i] for i in given], [solutions[i] for i in given]).tolist()

    def add_preferences(self, judges: Judges, batch: dict) -> None:
        from alignlab.models.logprobs import answer_logprobs

        logps = answer_logprobs(judges.model, batch)
        rows = len(logps.logps) // 2  # B chosen sequences, then B rejected
        chosen, rejected = logps.logps[:rows], logps.logps[rows:]
        self.preferred += (chosen > rejected).float().tolist()
        if judges.reference is not None:
            ref = judges.reference.answer_logprobs(batch).logps
            ratio_chosen, ratio_rejected = chosen - ref[:rows], rejected - ref[rows:]
            self.implicit += (ratio_chosen > ratio_rejected).float().tolist()
            self.logratios += ratio_chosen.tolist()
            self.ratio_tokens += logps.num_tokens[:rows].sum().item()

    def add_wins(self, judges: Judges, batch: dict, answers: list[str], datamodule) -> None:
        prompts = batch["prompt"]
        if judges.baseline is not None:
            size, system_prompt = len(prompts), datamodule.system_prompt
            others = complete(*judges.baseline, prompts, judges.max_new_tokens, size, system_prompt=system_prompt)
        else:
            others = batch[BASELINE_COLUMN[datamodule.kind]]
        ours, theirs = judges.scorer.score(prompts, answers), judges.scorer.score(prompts, others)
        self.wins += [1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(ours, theirs)]

    def metrics(self) -> tuple[dict, dict]:
        """(metrics, counts) of the report: only those measured."""
        metrics, counts = {}, {}
        if self.matched:
            metrics["exact_match"], counts["exact_match"] = _share(self.matched), len(self.matched)
        if self.preferred:
            metrics["preference_accuracy"], counts["pairs"] = _share(self.preferred), len(self.preferred)
        if self.implicit:
            metrics["implicit_reward_accuracy"] = _share(self.implicit)
            metrics["chosen_logratio"] = _share(self.logratios)
            metrics["chosen_logratio_per_token"] = sum(self.logratios) / max(self.ratio_tokens, 1.0)
        if self.wins:
            metrics["win_rate"] = _share(self.wins)
            counts.update(wins=self.wins.count(1.0), ties=self.wins.count(0.5), losses=self.wins.count(0.0))
        return metrics, counts


def greedy_answers(judges: Judges, batch: dict) -> list[str]:
    """The policy's greedy answers to a batch's prompts."""
    from alignlab.data.vision import select_vision

    prompts = slice(0, len(batch["prompt_input_ids"]))  # the first sequences' images are the prompts'
    return answer_batch(
        judges.model,
        judges.tokenizer,
        batch["prompt_input_ids"],
        batch["prompt_attention_mask"],
        judges.max_new_tokens,
        images=select_vision(batch, prompts),
    )


def report(model_folder, ref_model, reward_model, baseline, overrides, cfg, datamodule, metrics, counts) -> dict:
    """The JSON report: what was measured on which data, then the metrics and their counts."""
    from omegaconf import OmegaConf

    data = OmegaConf.to_container(cfg.data, resolve=True)
    out = {
        "model": str(model_folder),
        "ref_model": ref_model,
        "reward_model": reward_model,
        "baseline": baseline,
        "data": {"overrides": overrides, "kind": datamodule.kind, "module": data["_target_"], "source": data["source"]},
        "split": "eval",
        "max_length": datamodule.max_length,
        "rows": len(datamodule.splits["eval"]),
        "dropped_rows": datamodule.dropped.get("eval", 0),
        "max_new_tokens": cfg.evaluation.max_new_tokens,
    }
    if "tool_result_matches" in metrics or "num_turns" in metrics:  # episodes: their limits instead
        del out["max_new_tokens"]
        out |= {"max_turns": cfg.algorithm.max_turns, "max_completion_length": cfg.algorithm.max_completion_length}
    return {**out, "metrics": metrics, "counts": counts}


@torch.no_grad()
def episode_report(model, tokenizer, datamodule, algorithm, device) -> tuple[dict, dict]:
    """(metrics, counts) of greedy multi-turn episodes on the held-out prompts (see the module docstring):
    the tools and environment of `algorithm` (its tools, tool_call_format, tool_timeout, environment,
    max_turns, max_completion_length, generation_chunk_size), as GRPO's evaluation runs them."""
    from alignlab.online.generation import exact_match, stop_token_ids
    from alignlab.online.multiturn import (
        conversation,
        episode_metrics,
        episode_setup,
        greedy_sampler,
        open_episodes,
        run_episodes,
        tool_result_matches,
    )

    tools = (algorithm.tools, algorithm.tool_call_format, algorithm.tool_timeout, algorithm.environment)
    setup = episode_setup(*tools, tokenizer)
    stops = stop_token_ids(model, tokenizer)
    sampler = greedy_sampler(model, tokenizer, stops)
    episodes, matched, correct_calls = [], [], []
    for batch in datamodule.val_dataloader():
        columns = batch.get("columns", {})
        opened = open_episodes(batch["prompt_messages"], columns, 1, setup, tokenizer)
        limits = (algorithm.max_turns, algorithm.max_completion_length)
        run_episodes(sampler, tokenizer, opened, 1, *limits, stops, algorithm.generation_chunk_size, None, device)
        episodes += opened
        solutions = columns.get("solution") or batch.get("solution") or [None] * len(opened)
        given = [i for i, s in enumerate(solutions) if s is not None]  # a row without one is not counted
        if given:
            answers = [opened[i].final_answer for i in given]
            matched += exact_match(answers, [solutions[i] for i in given]).tolist()
            conversations = [conversation(opened[i]) for i in given]
            correct_calls += tool_result_matches(None, conversations, solution=[solutions[i] for i in given])
    metrics = dict(episode_metrics(episodes, algorithm.max_turns))
    counts = {"episodes": len(episodes)}
    if matched:
        metrics["exact_match"], counts["exact_match"] = _share(matched), len(matched)
        metrics["tool_result_matches"] = _share(correct_calls)
    rewards = [e.reward for e in episodes if e.reward is not None]
    if rewards:
        metrics["environment_reward"], counts["environment_reward"] = _share(rewards), len(rewards)
    return metrics, counts


def build_parser() -> argparse.ArgumentParser:
    """The command line of `python -m alignlab.evaluate`."""
    parser = argparse.ArgumentParser(
        prog="python -m alignlab.evaluate",
        description="Measure a trained model on a data set's held-out split; the report is JSON.",
    )
    parser.add_argument("--model", required=True, help="the model folder (<run>/model, <run>/adapter) or a Hub id")
    parser.add_argument("--ref-model", help="a reference model folder: DPO implicit reward accuracy and log-ratio")
    parser.add_argument("--reward-model", help="a reward-model folder: win rate of the model's greedy answers")
    parser.add_argument("--baseline-model", help="with --reward-model: compare with this model's greedy answers")
    parser.add_argument("--output", help="also write the report to this JSON file")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. data=arith_pairs eval_batch_size=32")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from alignlab.errors import AlignlabError

    parser = build_parser()
    args = parser.parse_intermixed_args(argv)  # overrides may come before, between or after the options
    if args.baseline_model and not args.reward_model:
        parser.error("--baseline-model needs --reward-model (the win rate compares the two models' answers)")
    if args.output and not Path(args.output).resolve().parent.is_dir():  # found out now, not after the work
        parser.error(f"--output {args.output}: no such folder to write it in")
    try:
        report = evaluate(
            args.model, args.overrides, args.ref_model, args.reward_model, args.baseline_model, args.device
        )
    except (AlignlabError, OSError) as e:
        print(f"alignlab.evaluate: error: {e}", file=sys.stderr)
        return 1
    text = json.dumps(report, indent=2)
    if args.output:
        Path(args.output).write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
