"""The columns reward functions require (issue 32 item 10 and the `accuracy`-without-`solution` friction):
every row is checked when the data is read, before any model loads or anything is written, in every
reading path, whatever the batch order; rows met later (a stream's) are checked when scored."""

from __future__ import annotations

import functools
import json

import pandas as pd
import pytest

from alignlab.algorithms.grpo import GRPO
from alignlab.algorithms.ppo import PPO
from alignlab.data import PromptDataModule
from alignlab.data.files import FileSource
from alignlab.errors import DataError
from alignlab.online.multiturn import on_final_answers
from alignlab.online.rewards import (
    REGISTRY,
    RewardFunctionError,
    build_reward_function,
    required_columns,
    score_completions,
)
from tests.conftest import compose

ROWS = [{"prompt": f"{i}+1=", "solution": str(i + 1)} for i in range(12)]
LACKING = [1, 4, 9]  # row numbers (from 1) without a solution


def rows_lacking(numbers=LACKING) -> list[dict]:
    return [{"prompt": r["prompt"]} if i + 1 in numbers else r for i, r in enumerate(ROWS)]


def write(path, rows: list[dict]):
    """`rows` in the file type `path` names: a missing solution is absent (JSON lines, JSON), an empty cell
    (CSV) or a null (Parquet)."""
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif path.suffix == ".json":
        path.write_text(json.dumps(rows))
    else:
        frame = pd.DataFrame([{"prompt": r["prompt"], "solution": r.get("solution")} for r in rows])
        frame.to_csv(path, index=False) if path.suffix == ".csv" else frame.to_parquet(path)
    return path


@pytest.fixture(scope="module")
def grpo_config():
    return compose(["algorithm=grpo"]).algorithm


def test_each_reward_function_says_which_columns_it_requires():
    assert {n: required_columns(build_reward_function(n)[1]) for n in REGISTRY} == {
        "accuracy": ("solution",),
        "exact_match": ("solution",),
        "format": (),
        "think_format": (),
        "length": (),
        "cosine": ("solution",),
        "repetition": (),
        "soft_overlong": (),  # completion_ids come from the trainer
    }

    def mine(prompts, completions, solution, hint=None, *, level, completion_ids, **columns):
        return [0.0] * len(completions)

    assert required_columns(mine) == ("solution", "level")  # no default: required; hint=None: optional
    assert required_columns(functools.partial(mine, level=2)) == ("solution",)  # bound by its `_target_` config
    assert required_columns(on_final_answers(REGISTRY["cosine"])) == ("solution",)  # multi-turn's wrapper
    mine.required_columns = ("answer",)  # a declaration wins
    assert required_columns(mine) == ("answer",)


@pytest.mark.parametrize("suffix", ["jsonl", "json", "csv", "parquet"])
@pytest.mark.parametrize("shuffle", [True, False])
def test_rows_lacking_a_required_column_are_refused_naming_file_rows_and_key(tmp_path, grpo_config, suffix, shuffle):
    path = write(tmp_path / f"prompts.{suffix}", rows_lacking())
    dm = PromptDataModule(FileSource(str(path), eval_fraction=0.25), shuffle=shuffle)
    with pytest.raises(DataError) as err:
        GRPO.check_rows(grpo_config, dm)  # the rows of both splits, whichever split each fell in
    message = str(err.value)
    assert message.startswith(f"{path}, 3 of its 12 rows (rows 1, 4 and 9): no `solution`")
    assert "the reward function 'accuracy' (algorithm.reward_funcs)" in message and "data.columns" in message
    GRPO.check_rows(grpo_config, PromptDataModule(FileSource(str(write(tmp_path / f"all.{suffix}", ROWS)))))


def test_a_mixture_source_without_the_column_is_named(tmp_path, grpo_config):
    good, bare = write(tmp_path / "good.jsonl", ROWS), write(tmp_path / "bare.jsonl", rows_lacking(range(1, 13)))
    dm = PromptDataModule(FileSource(str(good)), sources=[{"path": str(good)}, {"path": str(bare)}])
    with pytest.raises(DataError, match=rf"^{bare}, every one of its \d+ rows: no `solution`"):
        GRPO.check_rows(grpo_config, dm)


def test_a_stream_is_checked_when_opened_and_its_later_rows_when_scored(tmp_path, grpo_config):
    path = write(tmp_path / "prompts.jsonl", rows_lacking([2]))
    with pytest.raises(DataError, match=r"1 of its 12 rows \(row 2\): no `solution`"):
        GRPO.check_rows(grpo_config, PromptDataModule(FileSource(str(path), streaming=True)))
    # a row setup could not see: scoring stops before any function runs, naming the function and the row
    prompts = [[{"role": "user", "content": "1+1="}], [{"role": "user", "content": "2+2="}]]
    columns = {"solution": ["2", None]}
    with pytest.raises(
        RewardFunctionError, match=r"'accuracy' \(algorithm.reward_funcs\) needs the `solution`.*'2\+2='"
    ):
        score_completions([("accuracy", REGISTRY["accuracy"])], prompts, ["2", "4"], columns)
    with pytest.raises(RewardFunctionError, match="needs the `solution` column"):
        score_completions([("accuracy", REGISTRY["accuracy"])], prompts, ["2", "4"], {})


def test_ppo_checks_its_reward_functions_too_and_a_reward_model_needs_no_column(tmp_path):
    path = write(tmp_path / "prompts.jsonl", rows_lacking())
    dm = PromptDataModule(FileSource(str(path)))
    ppo = compose(["algorithm=ppo", "algorithm.reward_funcs=[length,accuracy]"]).algorithm
    with pytest.raises(DataError, match="no `solution`, which the reward function 'accuracy'"):
        PPO.check_rows(ppo, dm)
    PPO.check_rows(compose(["algorithm=ppo", "algorithm.reward_funcs=[length]"]).algorithm, dm)


def test_accuracy_without_a_solution_column_stops_before_the_model_loads(tmp_path, monkeypatch):
    import alignlab.train as training

    path = write(tmp_path / "prompts.jsonl", rows_lacking(range(1, 13)))
    monkeypatch.setattr(training, "load_model", lambda *a, **k: pytest.fail("the model loaded"))
    run = tmp_path / "run"
    overrides = ["algorithm=grpo", "data=custom_prompts", f"data.source.path={path}", "logger=csv"]
    with pytest.raises(DataError, match=r"every one of its 12 rows: no `solution`.*algorithm.reward_funcs"):
        training.train(compose(overrides, run))
    assert not (run / "config.yaml").exists()


def test_a_hub_folder_is_checked_in_both_splits_and_data_columns_supply_the_column(tmp_path, grpo_config):
    folder = tmp_path / "hub"
    (folder / "data").mkdir(parents=True)
    write(folder / "data" / "train-00000-of-00001.jsonl", ROWS)
    write(folder / "data" / "test-00000-of-00001.jsonl", rows_lacking([2]))  # the held-out split lacks one
    with pytest.raises(DataError, match=r"test-00000-of-00001\.jsonl, 1 of its 12 rows \(row 2\): no `solution`"):
        GRPO.check_rows(grpo_config, PromptDataModule(FileSource(str(folder), eval_split="test")))
    # the answers under another name, mapped onto `solution` as the message advises
    renamed = write(tmp_path / "renamed.jsonl", [{"prompt": r["prompt"], "answer": r["solution"]} for r in ROWS])
    GRPO.check_rows(grpo_config, PromptDataModule(FileSource(str(renamed)), columns={"answer": "solution"}))


def test_a_list_solution_for_a_one_value_reward_is_refused_at_setup(tmp_path, grpo_config):
    """accuracy and exact_match compare an answer with one value: a list never matches, so a row whose
    `solution` is a list stops at setup (naming file, row and field), not at the first reward call."""
    rows = [dict(r) for r in ROWS]
    rows[5]["solution"] = ["6", "six"]
    path = tmp_path / "lists.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError, match=rf"^{path}, row 6, field 'solution': 'accuracy' compares .* list"):
        GRPO.check_rows(grpo_config, PromptDataModule(FileSource(str(path)), shuffle=True))
    # a reward that takes lists as they are (e.g. `length`, or your own) is not held to it
    GRPO.check_rows(
        compose(["algorithm=grpo", "algorithm.reward_funcs=[length]"]).algorithm,
        PromptDataModule(FileSource(str(path))),
    )
