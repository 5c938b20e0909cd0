"""data's settings are checked in one place (alignlab.data.options): a DataModule built from Python and
the config check before a run (check_config → the module class's check_options) refuse alike."""

from __future__ import annotations

import re

import pytest
from omegaconf import OmegaConf

from alignlab.data import PromptDataModule, SFTDataModule
from alignlab.data.files import FileSource
from alignlab.data.options import OPTION_CHECKS, check_max_rows
from alignlab.errors import ConfigError
from tests.conftest import ListSource

BAD = [
    ("batch_size", 0, "data.batch_size must be a whole number >= 1, got 0"),
    ("eval_batch_size", 1.5, "data.eval_batch_size must be a whole number >= 1, got 1.5"),
    ("max_length", 1, "data.max_length must be a whole number >= 2, got 1"),
    ("max_length", "long", "data.max_length must be >= 2 .* or auto, got 'long'"),
    ("max_tokens_per_micro_batch", 0, "data.max_tokens_per_micro_batch must be a whole number >= 1 or null"),
    ("on_bad_row", "ignore", "data.on_bad_row must be one of"),
    ("system_prompt", "drop", "data.system_prompt must be one of"),
    ("truncation", "left", "data.truncation must be one of"),
    ("columns", {"a": "prompt", "b": "prompt"}, r"data.columns maps several columns onto \['prompt'\]"),
    ("system", ["a"], "data.system must be text"),
    ("row_converter", "nowhere_at_all.fn", "data.row_converter 'nowhere_at_all.fn' could not be imported"),
    ("train_on", "every", "data.train_on must be one of"),
]


@pytest.mark.parametrize(("key", "value", "message"), BAD, ids=[f"{k}={v}" for k, v, _ in BAD])
def test_the_constructor_and_the_config_check_refuse_alike(key, value, message):
    with pytest.raises(ConfigError, match=message):
        SFTDataModule(ListSource([]), **{key: value})
    with pytest.raises(ConfigError, match=message):
        SFTDataModule.check_options(OmegaConf.create({key: value}))  # what check_config runs on cfg.data


def test_every_setting_of_the_base_module_is_checked_and_train_on_is_sfts_own():
    assert {"batch_size", "max_length", "truncation", "row_converter"} <= set(OPTION_CHECKS)
    assert "train_on" in SFTDataModule.option_checks and "train_on" not in PromptDataModule.option_checks
    PromptDataModule.check_options(OmegaConf.create({"max_length": "auto", "batch_size": 2.0, "train_on": "x"}))


@pytest.mark.parametrize("value", [0, -3, 2.5, "many", True])
def test_max_rows_is_refused_alike_by_the_source_and_the_config_check(value):
    message = (
        rf"^data\.source\.max_rows \(or #N on the path\) must be a whole number >= 1, got {re.escape(repr(value))}; "
    )
    with pytest.raises(ConfigError, match=message):
        FileSource("rows.jsonl", max_rows=value)
    with pytest.raises(ConfigError, match=message):
        check_max_rows(OmegaConf.create({"max_rows": value}).max_rows)  # what check_config runs on data.source
    assert FileSource("rows.jsonl", max_rows=40.0).max_rows == 40.0 and FileSource("rows.jsonl#40").max_rows == 40
