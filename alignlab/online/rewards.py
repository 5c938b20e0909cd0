"""Reward functions for GRPO: a registry of named functions, reward-model folders, or any callable
given by dotted path.

A reward function is called as `fn(prompts, completions, **columns)`: prompts are message lists,
completions are the decoded answers, and every extra column of the data rows (e.g. `solution`)
arrives as a keyword argument holding one value per completion; so do `completion_ids`, each completion's
token ids (as TRL passes them), to a function that takes that keyword or **kwargs. It returns one float
per completion.
"""

from __future__ import annotations

import inspect
import math
import re
from collections.abc import Callable, Sequence
from typing import Any

import torch
from hydra.utils import instantiate

from alignlab.errors import AlignlabError, ConfigError
from alignlab.losses.grpo import soft_overlong_penalty
from alignlab.online.generation import matches_solution


class RewardFunctionError(AlignlabError):
    """A reward function raised, returned the wrong number of values, or a value that is not a finite number."""


def accuracy(prompts: Sequence, completions: Sequence[str], solution: Sequence | None = None, **columns) -> list[float]:
    """1.0 where the completion matches the row's `solution` (the same text, surrounding white space
    ignored, or the same number: see `alignlab.online.generation.matches_solution`), else 0.0."""
    if solution is None:
        raise ValueError("the data has no `solution` column")
    return [float(matches_solution(c, s)) for c, s in zip(completions, solution)]


def format_reward(prompts: Sequence, completions: Sequence[str], pattern: str = r"-?\d+", **columns) -> list[float]:
    """1.0 where the whole completion matches `pattern` (default: an integer), else 0.0."""
    compiled = re.compile(pattern, re.DOTALL)
    return [float(compiled.fullmatch(c.strip()) is not None) for c in completions]


def length_reward(prompts: Sequence, completions: Sequence[str], target: int = 2, **columns) -> list[float]:
    """1 − |len − target| / target in characters, floored at 0: 1.0 at exactly `target` characters."""
    return [max(0.0, 1 - abs(len(c) - target) / target) for c in completions]


def soft_overlong(
    prompts: Sequence,
    completions: Sequence[str],
    completion_ids: Sequence[Sequence[int]] | None = None,
    soft_max_length: int | None = None,
    soft_cache_length: int | None = None,
    **columns,
) -> list[float]:
    """DAPO's overlong reward shaping (Yu et al., 2025; ms-swift's `soft_overlong`): 0 up to
    soft_max_length − soft_cache_length completion tokens, then linearly down to −1 at soft_max_length,
    −1 beyond (alignlab.losses.grpo.soft_overlong_penalty). Lengths are counted in `completion_ids`, the
    completions' token ids as TRL passes them (through the stop token); GRPO binds the two lengths from
    `algorithm.soft_max_length` and `algorithm.soft_cache_length`."""
    if completion_ids is None:
        raise ValueError("soft_overlong needs `completion_ids`, the completions' token ids")
    if soft_max_length is None or soft_cache_length is None:
        raise ValueError("soft_overlong needs soft_max_length and soft_cache_length")
    lengths = torch.tensor([len(ids) for ids in completion_ids], dtype=torch.float64)
    return soft_overlong_penalty(lengths, soft_max_length, soft_cache_length).tolist()


REGISTRY: dict[str, Callable] = {
    "accuracy": accuracy,
    "format": format_reward,
    "length": length_reward,
    "soft_overlong": soft_overlong,
}


def accepts_keyword(fn: Callable, name: str) -> bool:
    """Whether `fn` takes a keyword argument `name` (named, or through **kwargs)."""
    try:
        parameters = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # no signature to read: pass it, as TRL does
        return True
    return any(p.name == name or p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)


def build_reward_function(spec: Any) -> tuple[str, Callable]:
    """(name, callable) from a registry name, a reward-model folder, or a dict with `_target_`.

    A dict may carry `name` (used in metrics); a `_target_` naming a function gets its other keys
    bound as keyword arguments; one naming a class is instantiated with them (e.g. RewardScorer).
    """
    if isinstance(spec, str):
        if spec in REGISTRY:
            return spec, REGISTRY[spec]
        from pathlib import Path

        from alignlab.models.reward import RewardScorer, is_reward_model_folder

        if is_reward_model_folder(spec):
            return f"reward_model:{Path(spec).name}", RewardScorer(spec)
        raise ConfigError(
            f"unknown reward function {spec!r}: use one of {sorted(REGISTRY)}, a reward-model "
            "folder, or {_target_: package.module.function}"
        )
    spec = dict(spec)
    name = spec.pop("name", None)
    target = spec.get("_target_")
    if not target:
        raise ConfigError(f"a reward function given as a mapping needs `_target_`, got {spec}")
    try:
        from hydra.utils import get_object

        obj = get_object(target)
    except Exception as e:
        raise ConfigError(f"reward function {target!r} could not be imported: {e}") from None
    built = instantiate({**spec, "_partial_": True}) if not isinstance(obj, type) else instantiate(spec)
    return name or target.rsplit(".", 1)[-1], built


def call_reward_function(name: str, fn: Callable, prompts: list, completions: list[str], columns: dict) -> list[float]:
    """Call one reward function, failing with its name if it raises or miscounts, and with its name and
    the completion's prompt if a value is None, not a number, NaN or infinite.

    Raises:
        RewardFunctionError: before any value reaches an advantage or a loss.
    """
    if "completion_ids" in columns and not accepts_keyword(fn, "completion_ids"):  # functions written before it
        columns = {k: v for k, v in columns.items() if k != "completion_ids"}
    try:
        values = fn(prompts, completions, **columns)
    except Exception as e:
        raise RewardFunctionError(f"reward function '{name}' raised {type(e).__name__}: {e}") from e
    values = list(values) if values is not None else []
    if len(values) != len(completions):
        raise RewardFunctionError(
            f"reward function '{name}' returned {len(values)} values for {len(completions)} completions"
        )
    out = []
    for i, value in enumerate(values):
        try:
            number = float(value)
        except (TypeError, ValueError):
            number = None
        if number is None or not math.isfinite(number):  # a NaN would spread to its group's advantages and the loss
            raise RewardFunctionError(
                f"reward function '{name}' returned {value!r} for completion {i + 1} of {len(values)}, the answer "
                f"{completions[i]!r} to the data row whose prompt is {_last_user_text(prompts[i])!r}; a reward must "
                "be a finite number: return e.g. 0.0 for an answer it cannot score"
            )
        out.append(number)
    return out


def _last_user_text(prompt: Any) -> str:
    """The last user message of a prompt (a message list, or text): what identifies its data row."""
    if isinstance(prompt, str):
        return prompt
    users = [m.get("content", "") for m in prompt or [] if isinstance(m, dict) and m.get("role") == "user"]
    return str(users[-1]) if users else str(prompt)
