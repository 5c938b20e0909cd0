"""The checks of the data modules' settings (`data.*`), one per key, written once.

The DataModule constructor runs them on its arguments, so a module built from Python refuses a bad value,
and alignlab.runner.config.check_config runs the same ones on the composed config before any model loads
(`AlignmentDataModule.check_options`), so a run stops at once. Each error names its key, `data.<key>`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from alignlab.data.formats import ROW_CONVERTERS
from alignlab.data.rows import ON_BAD_ROW
from alignlab.data.tokenize import SYSTEM_PROMPT
from alignlab.data.truncation import AUTO_LENGTH, TRUNCATION
from alignlab.errors import ConfigError

TRAIN_ON = ("all_assistant", "last_assistant")  # data.train_on (SFT): which assistant turns the loss covers

Check = Callable[[Any], None]


def _whole(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and float(value).is_integer()


def at_least(key: str, minimum: int, allow_null: bool = False) -> Check:
    """The check that `data.<key>` is a whole number >= minimum (or null, with allow_null)."""

    def check(value: Any) -> None:
        if not ((allow_null and value is None) or (_whole(value) and value >= minimum)):
            null = " or null" if allow_null else ""
            raise ConfigError(f"data.{key} must be a whole number >= {minimum}{null}, got {value!r}")

    return check


def one_of(key: str, choices: tuple) -> Check:
    """The check that `data.<key>` is one of `choices`."""

    def check(value: Any) -> None:
        if value not in choices:
            raise ConfigError(f"data.{key} must be one of {choices}, got {value!r}")

    return check


def check_max_rows(value: Any, key: str = "data.source") -> None:
    """`<key>.max_rows`, or `#N` on its path: null (every row) or a whole number >= 1, the train rows to
    sample. The one check of it, run by FileSource's constructor (a mixture's specs too: `key` is then
    data.sources[i]) and, before any model loads, by alignlab.runner.config.check_config."""
    if value is not None and not (_whole(value) and value >= 1):
        raise ConfigError(
            f"{key}.max_rows (or #N on the path) must be a whole number >= 1, got {value!r}; give how many "
            "train rows to sample, or null for all of them"
        )


def check_max_length(value: Any) -> None:
    """A whole number >= 2 (a prompt token and an answer token), or auto (chosen at setup)."""
    if value in AUTO_LENGTH:
        return
    if not _whole(value):
        raise ConfigError(f"data.max_length must be >= 2 (a prompt token and an answer token) or auto, got {value!r}")
    if value < 2:
        raise ConfigError(f"data.max_length must be a whole number >= 2, got {value!r} (a prompt and an answer token)")


def check_columns(columns: Any) -> None:
    """data.columns: a map of the file's column names to alignlab's, no two onto one name."""
    if columns is None:
        return
    if not isinstance(columns, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) and v for k, v in columns.items()
    ):
        raise ConfigError(
            f"data.columns must map the file's column names to alignlab's, e.g. {{question: prompt, answer: "
            f"solution}}, got {columns!r}"
        )
    targets = list(columns.values())
    twice = sorted({v for v in targets if targets.count(v) > 1})
    if twice:
        raise ConfigError(f"data.columns maps several columns onto {twice}; map one column onto each name")


def check_system(system: Any) -> None:
    """data.system: text (the default system message) or null."""
    if system is not None and not isinstance(system, str):
        raise ConfigError(f"data.system must be text (the default system message) or null, got {system!r}")


def check_row_converter(spec: Any) -> None:
    """data.row_converter: null, or a function by dotted path or `{_target_: path, **kwargs}` (imported)."""
    if spec is not None:
        ROW_CONVERTERS.check(spec)


# The checks every data module runs; a subclass adds its own keys' (SFTDataModule: train_on).
OPTION_CHECKS: dict[str, Check] = {
    "batch_size": at_least("batch_size", 1),
    "eval_batch_size": at_least("eval_batch_size", 1),
    "max_length": check_max_length,
    "max_tokens_per_micro_batch": at_least("max_tokens_per_micro_batch", 1, allow_null=True),
    "on_bad_row": one_of("on_bad_row", ON_BAD_ROW),
    "system_prompt": one_of("system_prompt", SYSTEM_PROMPT),
    "truncation": one_of("truncation", TRUNCATION),
    "columns": check_columns,
    "system": check_system,
    "row_converter": check_row_converter,
}


def check_options(options: Mapping[str, Any], checks: Mapping[str, Check] = OPTION_CHECKS) -> None:
    """Run the check of each key of `checks` that `options` (data's settings) gives.

    Raises:
        ConfigError: the first value out of range, naming `data.<key>`, what it must be and what it is.
    """
    for key, check in checks.items():
        if key in options:
            check(options[key])
