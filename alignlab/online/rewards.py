"""Reward functions for GRPO and PPO: the built-in ones, registered by name in `REWARD_FUNCTIONS`
(alignlab.registry.Registry), reward-model folders, or any callable given by dotted path (`_target_`);
and the one scoring path every online algorithm calls (`score_completions`).

A reward function is called as `fn(prompts, completions, **columns)`: prompts are message lists,
completions are the decoded answers, and every extra column of the data rows (e.g. `solution`)
arrives as a keyword argument holding one value per completion; so do `completion_ids`, each completion's
token ids (as TRL passes them), to a function that takes that keyword or **kwargs. It returns one float
per completion, or (an `async def` function) a coroutine of them: those run concurrently
(`score_completions`).
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import math
import re
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from hydra.utils import instantiate

from alignlab.errors import AlignlabError, ConfigError, DataError
from alignlab.losses.grpo import soft_overlong_penalty
from alignlab.online.generation import _number, matches_solution
from alignlab.registry import Registry, import_object


class RewardFunctionError(AlignlabError):
    """A reward function raised, returned the wrong number of values, or a value that is not a finite number."""


# The built-in reward functions `algorithm.reward_funcs` may name: a new one is one function decorated with
# `@REWARD_FUNCTIONS.register("name")` below (a callable object: `REWARD_FUNCTIONS.add("name", obj)`).
# Users' own come by `{_target_: package.module.function}` (`build_reward_function`).
REWARD_FUNCTIONS: Registry[Callable] = Registry("reward function", "algorithm.reward_funcs")


# -- correctness --------------------------------------------------------------------------------------
@REWARD_FUNCTIONS.register("exact_match")
def exact_match(
    prompts: Sequence, completions: Sequence[str], solution: Sequence | None = None, **columns
) -> list[float]:
    """1.0 where the completion matches the row's `solution` (the same text, surrounding white space
    ignored, or the same finite decimal: see `alignlab.online.generation.matches_solution`), else 0.0.
    What `accuracy` was before math-verify, and what held-out `exact_match` measures."""
    if solution is None:
        raise ValueError("the data has no `solution` column")
    _one_value_each(solution, "exact_match")
    return [float(matches_solution(c, s)) for c, s in zip(completions, solution)]


exact_match.required_columns = ("solution",)
exact_match.one_value_columns = ("solution",)  # compared with one value: a list or object never matches


def _one_value_each(solution: Sequence, name: str) -> None:
    """Raise ValueError for a row whose `solution` is a list or an object: `name` compares the answer
    with one value (the text of a list never matches, silently)."""
    bad = next((s for s in solution if isinstance(s, (list, tuple, dict))), None)
    if bad is not None:
        raise ValueError(
            f"{name} compares each answer with one `solution` value, but a row's solution is a "
            f"{type(bad).__name__} ({str(bad)[:60]}); give one value per row (a struct's field by a dotted "
            "data.columns name, e.g. {reward_model.ground_truth: solution}), or use a reward function of your own"
        )


def _math_verify():
    """math-verify's parse and verify, imported on first use (it imports sympy, a second or more)."""
    from math_verify import parse, verify

    if threading.current_thread() is not threading.main_thread():
        # its timeouts use signal.alarm, which only the main thread may set: run without them there (as TRL does)
        logging.getLogger("math_verify").setLevel(logging.ERROR)
        return (lambda text: parse(text, parsing_timeout=None)), (
            lambda gold, answer: verify(gold, answer, timeout_seconds=None)
        )
    return parse, verify


def _normalised(text: str) -> str:
    """Lower case, inner white space collapsed, surrounding white space and a final full stop dropped."""
    return " ".join(str(text).split()).lower().removesuffix(".").strip()


# An answer a completion marks as its final one: \boxed{...}, $...$, \(...\), \[...\], GSM8K's `#### 42`, or
# the whole completion a LaTeX expression (`\frac{3}{2}`).
MARKED_ANSWER = re.compile(r"\\boxed\{.*\}|\$[^$]+\$|\\\(.+\\\)|\\\[.+\\\]|####\s*\S|\A\s*\\[a-zA-Z]+\{", re.DOTALL)
# A bare arithmetic expression: numbers joined by + − × ÷ (`24/2`, `10+2`).
EXPRESSION = re.compile(r"[-+]?\d+(?:\.\d+)?(?:\s*[-+*/]\s*[-+]?\d+(?:\.\d+)?)*")


def _final(text: str) -> str:
    """The text after GSM8K's last `####` marker, or the whole text."""
    return text.rsplit("####", 1)[1].strip() if "####" in text else text


def is_correct(answer: str, solution: Any) -> bool:
    """Whether `answer` gives `solution`.

    1. The same text or the same plain number (`matches_solution`, the exact comparison): right.
    2. A solution that is a plain number: a completion that marks its answer (`MARKED_ANSWER`: `\\boxed{}`,
       `$…$`, `#### 42`, a LaTeX expression) is read by math-verify; others are wrong (as the exact comparison said).
       So the exact comparison wins for plain numbers: math-verify would read `40x7` as 40, `12 12` as 12
       and round 12345678901234567890 to ...891, and the bundled arithmetic task's rewards (GRPO's
       numbers on it) are what they were before math-verify.
    3. A solution math-verify parses (LaTeX such as `\\boxed{12}` or `\\frac{3}{2}`, `#### 42`): a plain
       number, a bare expression (`24/2`) or a marked answer is right when math-verify verifies it
       equal; free text without a marked answer is wrong (as TRL's `accuracy_reward`, which reads only
       LaTeX answers).
    4. Otherwise (words, names, labels): the same text once lower-cased, white space collapsed and a
       final full stop dropped.
    A missing solution (None) is never matched.
    """
    if solution is None:
        return False
    if matches_solution(answer, solution):
        return True
    text, expected = answer.strip(), _final(str(solution).strip())
    plain_answer, marked = _number(text) is not None, MARKED_ANSWER.search(text) is not None
    if _number(expected) is not None and not marked:
        return plain_answer and _number(text) == _number(expected)  # exact, as matches_solution reads `#### 42`
    parse, verify = _math_verify()
    gold = parse(expected)
    if not gold:  # not mathematics
        return _normalised(answer) == _normalised(expected)
    if not (plain_answer or marked or EXPRESSION.fullmatch(text)):
        return False
    return bool(verify(gold, parse(_final(text))))


@REWARD_FUNCTIONS.register("accuracy")
def accuracy(prompts: Sequence, completions: Sequence[str], solution: Sequence | None = None, **columns) -> list[float]:
    """1.0 where the completion gives the row's `solution` (`is_correct`: math-verify's equivalence for
    LaTeX, `\\boxed{}`, fractions and `#### 42`; normalised text for words), else 0.0.

    For a solution that is a plain number, the exact comparison (`exact_match`,
    `alignlab.online.generation.matches_solution`) wins wherever math-verify would disagree with it: only a
    completion that marks its answer (`\\boxed{}`, `$…$`, `#### 42`) is read by math-verify. The bundled
    arithmetic task's scores, and so its GRPO runs, are what they were before math-verify.

    Raises:
        ValueError: the data has no `solution` column, or a row's solution is a list or an object.
    """
    if solution is None:
        raise ValueError("the data has no `solution` column")
    _one_value_each(solution, "accuracy")
    return [float(is_correct(c, s)) for c, s in zip(completions, solution)]


accuracy.required_columns = ("solution",)
accuracy.one_value_columns = ("solution",)


# -- format ---------------------------------------------------------------------------------------------
class RegexFormat:
    """1.0 where the completion matches `pattern` (a Python regular expression, `.` matching new
    lines too), else 0.0. `mode`: `fullmatch` (the whole stripped completion), `match` (from its start)
    or `search` (anywhere).

    `{_target_: alignlab.online.rewards.regex_format, pattern: '<answer>.*</answer>'}` in `reward_funcs`.

    Raises:
        ConfigError: `pattern` is not a regular expression or `mode` is unknown (when the config is checked).
    """

    modes = ("fullmatch", "match", "search")

    def __init__(self, pattern: str, mode: str = "fullmatch"):
        if mode not in self.modes:
            raise ConfigError(f"regex_format mode must be one of {self.modes}, got {mode!r}")
        try:
            self.compiled = re.compile(pattern, re.DOTALL)
        except (re.error, TypeError) as e:
            raise ConfigError(f"regex_format pattern {pattern!r} is not a regular expression: {e}") from None
        self.pattern, self.mode = pattern, mode
        self.__name__ = "regex_format"

    def __call__(self, prompts: Sequence, completions: Sequence[str], **columns) -> list[float]:
        find = getattr(self.compiled, self.mode)
        return [float(find(c.strip() if self.mode == "fullmatch" else c) is not None) for c in completions]


regex_format = RegexFormat  # the name a config gives as `_target_`


@REWARD_FUNCTIONS.register("format")
def format_reward(prompts: Sequence, completions: Sequence[str], pattern: str = r"-?\d+", **columns) -> list[float]:
    """1.0 where the whole completion matches `pattern` (default: an integer), else 0.0."""
    return RegexFormat(pattern)(prompts, completions)


# `<think>reasoning</think>` at the start (after white space), then the answer
THINK_FORMAT = re.compile(r"\s*<think>(.*?)</think>(.*)", re.DOTALL)


@REWARD_FUNCTIONS.register("think_format")
def think_format(prompts: Sequence, completions: Sequence[str], **columns) -> list[float]:
    """1.0 where the completion is `<think>reasoning</think>` followed by a non-empty answer (reasoning
    models' format, e.g. DeepSeek-R1's; TRL's `think_format_reward` also accepts an empty answer), with
    no other think tag, else 0.0. Leading white space is allowed."""
    return [float(_think_then_answer(c)) for c in completions]


def _think_then_answer(text: str) -> bool:
    found = THINK_FORMAT.fullmatch(text)
    if found is None:
        return False
    reasoning, answer = found.groups()
    return "<think>" not in reasoning and "<think>" not in answer and "</think>" not in answer and bool(answer.strip())


@REWARD_FUNCTIONS.register("length")
def length_reward(prompts: Sequence, completions: Sequence[str], target: int = 2, **columns) -> list[float]:
    """1 − |len − target| / target in characters, floored at 0: 1.0 at exactly `target` characters."""
    return [max(0.0, 1 - abs(len(c) - target) / target) for c in completions]


@REWARD_FUNCTIONS.register("soft_overlong")
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


# -- length-scaled correctness and repetition -----------------------------------------------------------
def cosine_scaled(
    length: float,
    correct: bool,
    max_len: float,
    min_value_wrong: float,
    max_value_wrong: float,
    min_value_correct: float,
    max_value_correct: float,
) -> float:
    """The cosine length schedule of Yeo et al. (2025), "Demystifying Long Chain-of-Thought Reasoning in
    LLMs", eq. 1 / appendix C.1: v_min + ½(v_max − v_min)(1 + cos(π·min(length/max_len, 1))).

    A correct answer goes from `max_value_correct` (length 0) down to `min_value_correct` (max_len); a
    wrong one from `min_value_wrong` (length 0) up to `max_value_wrong` (max_len): short right answers
    earn most, short wrong ones lose most. Lengths past max_len keep max_len's value (cos is periodic)."""
    progress = min(length / max_len, 1.0)
    low, high = (min_value_correct, max_value_correct) if correct else (max_value_wrong, min_value_wrong)
    return low + 0.5 * (high - low) * (1.0 + math.cos(progress * math.pi))


class CosineReward:
    """Length-scaled correctness (Yeo et al. 2025): `cosine_scaled` of each completion's length in
    characters and its correctness (`accuracy`: math-verify, exact for plain numbers).

    Parameters and defaults are TRL's `get_cosine_scaled_reward` (open-r1's `cosine_*`; the paper's
    r_0^c, r_L^c, r_0^w, r_L^w): `max_len` 1000, `min_value_wrong` −1.0, `max_value_wrong` −0.5,
    `min_value_correct` 0.5, `max_value_correct` 1.0. TRL counts tokens; alignlab's reward functions see
    text, so lengths are characters (set `max_len` in characters).

    Raises:
        ConfigError: max_len is not positive (when the config is checked).
    """

    required_columns = ("solution",)

    def __init__(
        self,
        max_len: int = 1000,
        min_value_wrong: float = -1.0,
        max_value_wrong: float = -0.5,
        min_value_correct: float = 0.5,
        max_value_correct: float = 1.0,
    ):
        if not max_len > 0:
            raise ConfigError(f"cosine reward: max_len must be > 0, got {max_len}")
        self.max_len = max_len
        self.values = (min_value_wrong, max_value_wrong, min_value_correct, max_value_correct)
        self.__name__ = "cosine"

    def __call__(
        self, prompts: Sequence, completions: Sequence[str], solution: Sequence | None = None, **columns
    ) -> list[float]:
        right = accuracy(prompts, completions, solution)
        return [cosine_scaled(len(c), r == 1.0, self.max_len, *self.values) for c, r in zip(completions, right)]


def repetition_penalty(words: Sequence[str], ngram_size: int, max_penalty: float) -> float:
    """(1 − unique n-grams / n-grams) · max_penalty over a completion's words (Yeo et al. 2025,
    appendix C.2; open-r1's and ms-swift's n-grams of lower-cased white-space-separated words); 0.0 for
    fewer than `ngram_size` words."""
    if len(words) < ngram_size:
        return 0.0
    ngrams = list(zip(*[words[i:] for i in range(ngram_size)]))
    repeated = 1 - len(set(ngrams)) / len(ngrams)
    return repeated * max_penalty if repeated else 0.0  # never −0.0


class RepetitionPenalty:
    """An n-gram repetition penalty in [max_penalty, 0] (`repetition_penalty`). Parameters and defaults
    are TRL's `get_repetition_penalty_reward` (ms-swift's and open-r1's `repetition_n_grams`,
    `repetition_max_penalty`): `ngram_size` 3, `max_penalty` −1.0. TRL counts token n-grams; here the
    n-grams are of words, as in open-r1 and ms-swift.

    Raises:
        ConfigError: ngram_size < 1 or max_penalty > 0 (when the config is checked).
    """

    def __init__(self, ngram_size: int = 3, max_penalty: float = -1.0):
        if ngram_size < 1:
            raise ConfigError(f"repetition reward: ngram_size must be >= 1, got {ngram_size}")
        if max_penalty > 0:
            raise ConfigError(f"repetition reward: max_penalty must be <= 0 (a penalty), got {max_penalty}")
        self.ngram_size, self.max_penalty = ngram_size, max_penalty
        self.__name__ = "repetition"

    def __call__(self, prompts: Sequence, completions: Sequence[str], **columns) -> list[float]:
        return [repetition_penalty(c.lower().split(), self.ngram_size, self.max_penalty) for c in completions]


REWARD_FUNCTIONS.add("cosine", CosineReward())
REWARD_FUNCTIONS.add("repetition", RepetitionPenalty())


class _Functions(Mapping):
    """`REGISTRY` as callers before REWARD_FUNCTIONS read it: a live view, name -> function."""

    def __getitem__(self, name: str) -> Callable:
        if name not in REWARD_FUNCTIONS:
            raise KeyError(name)
        return REWARD_FUNCTIONS[name].fn

    def __iter__(self) -> Iterator[str]:
        return iter(REWARD_FUNCTIONS)

    def __len__(self) -> int:
        return len(REWARD_FUNCTIONS)


REGISTRY: Mapping[str, Callable] = _Functions()


def accepts_keyword(fn: Callable, name: str) -> bool:
    """Whether `fn` takes a keyword argument `name` (named, or through **kwargs)."""
    try:
        parameters = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # no signature to read: pass it, as TRL does
        return True
    return any(p.name == name or p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)


# What the trainer passes to reward functions itself (GRPO: each completion's token ids, a multi-turn
# episode's environment reward), never a column of the data.
TRAINER_COLUMNS = ("completion_ids", "environment_reward")


def required_columns(fn: Callable) -> tuple[str, ...]:
    """The data columns a reward function cannot score without: its `required_columns` attribute where it
    declares one (the registry's `accuracy`, `exact_match` and `cosine` declare `solution`), else the
    keyword parameters after (prompts, completions) that have no default and are not bound (a `_target_`
    function's bound keywords), less what the trainer passes itself (TRAINER_COLUMNS)."""
    bound: set[str] = set()
    while True:
        declared = getattr(fn, "required_columns", None)
        if declared is not None:
            return tuple(c for c in declared if c not in bound)
        if isinstance(fn, functools.partial):
            bound |= set(fn.keywords)
            fn = fn.func
        elif getattr(fn, "__wrapped__", None) is not None:
            fn = fn.__wrapped__
        else:
            break
    try:
        parameters = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return ()
    named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    positional = [p for p in parameters if p.kind in (inspect.Parameter.POSITIONAL_ONLY, *named)]
    columns = [p for p in positional[2:] if p.kind in named]  # the first two take prompts and completions
    return tuple(
        p.name
        for p in columns
        if p.default is inspect.Parameter.empty and p.name not in bound and p.name not in TRAINER_COLUMNS
    )


def is_missing(value: Any) -> bool:
    """A column value that is not there: None (JSON null, a Parquet null, a row or a mixture's source
    without the column), a float NaN (pandas' empty cell) or blank text (a CSV's empty cell)."""
    if isinstance(value, str):
        return not value.strip()
    return value is None or (isinstance(value, float) and math.isnan(value))


def _rows_text(numbers: list) -> str:
    """'rows 3, 7 and 9', the first few row numbers of a file, and how many more."""
    shown = [str(n) for n in sorted(n for n in numbers if n is not None)[:5]]
    if not shown:
        return f"{len(numbers)} rows"
    more = len(numbers) - len(shown)
    listed = ", ".join(shown[:-1]) + f" and {shown[-1]}" if len(shown) > 1 else shown[0]
    return f"row{'s' if len(numbers) > 1 else ''} {listed}" + (f" and {more} more" if more else "")


def _column_users(functions: Sequence[tuple[str, Callable]]) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """({column: the reward functions that require it}, {column: those that compare it with one value,
    not a list or an object}), in the order of `functions`."""
    needs: dict[str, list[str]] = {}
    single: dict[str, list[str]] = {}
    for name, fn in functions:
        for column in required_columns(fn):
            needs.setdefault(column, []).append(name)
        for column in getattr(fn, "one_value_columns", ()):
            single.setdefault(column, []).append(name)
    return needs, single


def _rows_and_locator(splits: dict, origin: Callable, describe: str) -> tuple[list[dict], Callable]:
    """Every split's rows as read (a stream's first rows, its `head`), and row -> (file, row number):
    the source's `origin`, else the stream's name and row number, else (`describe`, None)."""
    rows, streamed = [], {}
    for split in splits.values():
        if hasattr(split, "head"):  # a stream: its first rows, in the order read (row numbers of the stream)
            name = split.describe() if hasattr(split, "describe") else describe
            streamed |= {id(row): (name, i + 1) for i, row in enumerate(split.head)}
        rows += list(getattr(split, "head", split) or [])
    return rows, lambda row: (origin(row) or streamed.get(id(row)) or (describe, None))[:2]


def _missing_column_error(column: str, names: list[str], files: dict[str, list], totals: dict[str, int]) -> DataError:
    """The error for rows lacking `column`: {file: row numbers lacking it} of {file: its rows}, and the
    reward functions (`names`) that need it, with the ways to give it."""
    located = "; ".join(
        f"{file}, every one of its {totals[file]} rows"
        if len(numbers) == totals[file]
        else f"{file}, {len(numbers)} of its {totals[file]} rows ({_rows_text(numbers)})"
        for file, numbers in files.items()
    )
    listed = ", ".join(f"'{n}'" for n in names)
    return DataError(
        located,
        f"no `{column}`, which the reward function{'s' if len(names) > 1 else ''} {listed} "
        f"(algorithm.reward_funcs) need{'' if len(names) > 1 else 's'} to score a completion (without it the "
        f"answer would score 0 whatever it says). Give every row a `{column}`, map the column that holds it with "
        f"data.columns (e.g. data.columns={{answer: {column}}}), leave those rows out, or use reward functions "
        "that need no such column",
    )


def check_reward_columns(
    functions: Sequence[tuple[str, Callable]], splits: dict, origin: Callable, describe: str
) -> None:
    """Every row of every split has each column a reward function requires (`required_columns`), so that
    no completion is scored 0 for want of its `solution`, whatever the batch order; checked on the rows
    as read, before any model loads or anything is written.

    Args:
        functions: (name, callable) of `algorithm.reward_funcs`.
        splits: {split: canonical rows}; a stream (RowStream) is checked on the rows read when it opened
            (its later rows: `check_batch_columns`, when they are met).
        origin: row -> (file, row number, field) or None, as the data source tells it.
        describe: the data's description, for rows without an origin.
    Raises:
        DataError: naming the file(s), the rows lacking the column (of how many), the reward functions
            that need it and `algorithm.reward_funcs`.
    """
    needs, single = _column_users(functions)
    if not needs:
        return
    rows, locate = _rows_and_locator(splits, origin, describe)
    for column, names in needs.items():
        files: dict[str, list] = {}  # file -> row numbers lacking the column
        totals: dict[str, int] = {}  # file -> its rows (both splits)
        for row in rows:
            file, number = locate(row)
            totals[file] = totals.get(file, 0) + 1
            if is_missing(row.get(column)):
                files.setdefault(file, []).append(number)
        for row in rows if column in single else ():
            if isinstance(row.get(column), (list, tuple, dict)):
                file, number = locate(row)
                try:
                    _one_value_each([row[column]], " and ".join(f"'{n}'" for n in single[column]))
                except ValueError as e:
                    raise DataError(file, f"{e} (algorithm.reward_funcs)", row=number, field=column) from None
        if files:
            raise _missing_column_error(column, names, files, totals)


def check_batch_columns(functions: Sequence[tuple[str, Callable]], prompts: list, columns: dict) -> None:
    """At scoring time, the same rule as `check_reward_columns` for rows setup could not see (a stream's
    later rows): a completion whose row lacks a required column stops the run naming the function, the
    column and the row's prompt, before any value reaches an advantage.

    Raises:
        RewardFunctionError
    """
    for name, fn in functions:
        for column in required_columns(fn):
            values = columns.get(column)
            for i in range(len(prompts)):
                if values is None or is_missing(values[i]):
                    raise RewardFunctionError(
                        f"reward function '{name}' (algorithm.reward_funcs) needs the `{column}` column, and the data "
                        f"row whose prompt is {_last_user_text(prompts[i])!r} has none; give every row a `{column}` "
                        "(or map it with data.columns)"
                    )


def build_reward_function(spec: Any) -> tuple[str, Callable]:
    """(name, callable) from a name in REWARD_FUNCTIONS, a reward-model folder, or a dict with `_target_`.

    A dict may carry `name` (used in metrics); a `_target_` naming a function gets its other keys
    bound as keyword arguments; one naming a class is instantiated with them (e.g. RewardScorer).
    """
    if isinstance(spec, str):
        if spec in REWARD_FUNCTIONS:
            return spec, REWARD_FUNCTIONS[spec].fn
        from pathlib import Path

        from alignlab.models.reward import RewardScorer, is_reward_model_folder

        if is_reward_model_folder(spec):
            return f"reward_model:{Path(spec).name}", RewardScorer(spec)
        raise ConfigError(
            f"unknown reward function {spec!r}: use one of {sorted(REWARD_FUNCTIONS)}, a reward-model "
            "folder, or {_target_: package.module.function}"
        )
    spec = dict(spec)
    name = spec.pop("name", None)
    target = spec.get("_target_")
    if not target:
        raise ConfigError(f"a reward function given as a mapping needs `_target_`, got {spec}")
    obj = import_object(target, f"reward function {target!r}")  # names what is missing: module, attribute
    if isinstance(obj, type):  # a class (RegexFormat, CosineReward, ...): built, so it checks its arguments now
        try:
            built = instantiate(spec)
        except ConfigError:
            raise
        except Exception as e:
            cause = e.__cause__ if isinstance(e.__cause__, ConfigError) else None
            if cause is not None:  # hydra wraps what the constructor raised
                raise cause from None
            raise ConfigError(f"reward function {target!r} could not be built from {spec}: {e}") from None
        return name or getattr(built, "__name__", None) or target.rsplit(".", 1)[-1], built
    return name or target.rsplit(".", 1)[-1], instantiate({**spec, "_partial_": True})


def check_reward_funcs(funcs: Sequence, weights: Sequence[float] | None) -> None:
    """`algorithm.reward_funcs` and `algorithm.reward_weights`, before any model loads: one weight per
    function, and every function buildable (unknown names, unimportable targets, bad arguments).

    Raises:
        ConfigError: naming the key.
    """
    if weights is not None and len(weights) != len(funcs):
        raise ConfigError(
            f"algorithm.reward_weights has {len(weights)} weights for {len(funcs)} reward functions "
            "(algorithm.reward_funcs)"
        )
    for spec in funcs:
        build_reward_function(spec)


def is_async(fn: Callable) -> bool:
    """Whether calling `fn` gives a coroutine: an `async def` function, a partial of one, or an object
    whose `__call__` is one."""
    while hasattr(fn, "func"):  # functools.partial (a `_target_` function with bound keywords)
        fn = fn.func
    return inspect.iscoroutinefunction(fn) or (callable(fn) and inspect.iscoroutinefunction(fn.__call__))


def call_reward_function(name: str, fn: Callable, prompts: list, completions: list[str], columns: dict) -> list[float]:
    """Call one reward function (awaited to its end if it is `async`), failing with its name if it
    raises or miscounts, and with its name and the completion's prompt if a value is None, not a number,
    NaN or infinite.

    Raises:
        RewardFunctionError: before any value reaches an advantage or a loss.
    """
    values, _ = score_completions([(name, fn)], prompts, completions, columns)
    return values[name]


def score_completions(
    functions: Sequence[tuple[str, Callable]], prompts: list, completions: list[str], columns: dict
) -> tuple[dict[str, list[float]], dict[str, float]]:
    """Every reward function's values, and the seconds each took: ({name: [N] floats}, {name: s}).

    Batched (plain) functions run one after another; `async` ones run concurrently on an event loop
    (TRL's `asyncio.gather`), each timed from the loop's start to its own end. Every value is checked
    as `call_reward_function` says.

    Raises:
        RewardFunctionError: a function raised, miscounted or gave a value that is not a finite number.
    """
    values: dict[str, list[float]] = {}
    seconds: dict[str, float] = {}
    pending = []
    check_batch_columns(functions, prompts, columns)  # before any function runs: no value from a missing column
    functions = [(name, _taking_ids(fn, columns)) for name, fn in functions]
    for name, fn in functions:
        if is_async(fn):
            pending.append((name, fn))
            continue
        start = time.perf_counter()
        try:
            out = fn(prompts, completions, **columns)
        except Exception as e:
            raise RewardFunctionError(f"reward function '{name}' raised {type(e).__name__}: {e}") from e
        seconds[name] = time.perf_counter() - start
        values[name] = _checked(name, out, prompts, completions)
    if pending:
        for name, (out, took) in zip(
            [n for n, _ in pending], _run_concurrently(pending, prompts, completions, columns)
        ):
            if isinstance(out, BaseException):
                raise RewardFunctionError(f"reward function '{name}' raised {type(out).__name__}: {out}") from out
            seconds[name] = took
            values[name] = _checked(name, out, prompts, completions)
    return {name: values[name] for name, _ in functions}, {name: seconds[name] for name, _ in functions}


def _taking_ids(fn: Callable, columns: dict) -> Callable:
    """`fn`, or, when the columns carry `completion_ids` and `fn` does not take them (a function written
    before they were passed), `fn` called without them."""
    if "completion_ids" not in columns or accepts_keyword(fn, "completion_ids"):
        return fn
    if is_async(fn):

        async def without_ids(prompts, completions, completion_ids=None, **rest):
            return await fn(prompts, completions, **rest)

    else:

        def without_ids(prompts, completions, completion_ids=None, **rest):
            return fn(prompts, completions, **rest)

    return without_ids


def _run_concurrently(functions: list, prompts: list, completions: list[str], columns: dict) -> list:
    """[(values or the exception raised, seconds)] of `async` reward functions run together."""

    async def timed(fn, start):
        try:
            out = await fn(prompts, completions, **columns)
        except Exception as e:
            out = e
        return out, time.perf_counter() - start

    async def together():
        start = time.perf_counter()
        return await asyncio.gather(*(timed(fn, start) for _, fn in functions))

    try:
        asyncio.get_running_loop()
    except RuntimeError:  # the usual case: no loop in this thread
        return asyncio.run(together())
    # called from inside a running loop (a notebook): run on a loop of its own in another thread
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, together()).result()


def _checked(name: str, values: Any, prompts: list, completions: list[str]) -> list[float]:
    """`values` as floats, or RewardFunctionError naming the function (and the row of a bad value)."""
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
