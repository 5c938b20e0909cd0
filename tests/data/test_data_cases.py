"""The shared failing data inputs (`../shared/cases/`, see its README), each with the right behaviour,
and the same fault in other file formats: pairs that truncation or the data make meaningless, empty
messages, and columns that must arrive as written."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pandas as pd
import pytest

from alignlab.data import LabelledDataModule, PairwiseDataModule
from alignlab.data.files import FileSource
from alignlab.errors import DataError
from alignlab.train import train
from tests.conftest import CASES, QUIET, compose

# CI checks the shared folder out beside the clone; ALIGNLAB_CASES points at another copy.
pytestmark = pytest.mark.skipif(
    not CASES.is_dir(), reason=f"the shared failing inputs are not at {CASES} (set ALIGNLAB_CASES to their folder)"
)


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def as_parquet(path: Path, tmp_path: Path) -> Path:
    """The same rows written to Parquet by pandas (a key a row lacks becomes null)."""
    out = tmp_path / (path.stem + ".parquet")
    pd.DataFrame(lines(path)).to_parquet(out)
    return out


def datamodule(path: Path, max_length: int, **kwargs) -> PairwiseDataModule:
    return PairwiseDataModule(FileSource(str(path), eval_path=str(path)), batch_size=4, max_length=max_length, **kwargs)


# -- truncation_identical_pair ------------------------------------------------------------------
def test_pairs_identical_after_truncation_leave_nothing_to_train_on_and_the_error_names_max_length(tiny):
    _, tokenizer = tiny
    pairs = CASES / "truncation_identical_pair" / "pairs.jsonl"
    dm = datamodule(pairs, max_length=50)
    dm.set_tokenizer(tokenizer)
    with pytest.raises(DataError) as err:
        dm.setup()
    assert str(err.value) == (
        f"{pairs}: no train row is usable at max_length=50: 12 of 12 rows whose chosen and rejected answers "
        "are the same tokens once cut to max_length=50 (they differ only after it); raise max_length, or "
        "shorten what the two answers share"
    )
    dm = datamodule(pairs, max_length=128)  # room for the answers' different endings
    dm.set_tokenizer(tokenizer)
    dm.setup()
    assert dm.dropped == {"train": 0, "eval": 0} and len(dm.splits["train"]) == 12
    kto = LabelledDataModule(FileSource(str(pairs), eval_path=str(pairs)), unpair=True, max_length=50)
    kto.set_tokenizer(tokenizer)
    with pytest.raises(DataError, match=r"no train row is usable at max_length=50: 24 of 24 rows whose chosen"):
        kto.setup()
    with pytest.raises(DataError, match=r"identical_text\.jsonl, row 1, field 'rejected': identical to the chosen"):
        FileSource(str(CASES / "truncation_identical_pair" / "identical_text.jsonl")).load("pairwise")


def test_a_run_with_no_pair_left_after_truncation_stops_before_writing_its_folder(tmp_path):
    pairs = CASES / "truncation_identical_pair" / "pairs.jsonl"
    run = tmp_path / "run"
    overrides = ["data=custom_pairs", f"data.source.path={pairs}", "max_length=50", "trainer.max_steps=1", *QUIET]
    with pytest.raises(DataError, match=r"no train row is usable at max_length=50: 11 of 11 rows whose chosen"):
        train(compose(overrides, run))  # 11: one of the 12 rows is held out
    assert not run.exists() or not any(run.iterdir())


def test_a_dpo_run_counts_the_pairs_truncation_made_identical_in_its_summary(tmp_path):
    mixed = tmp_path / "pairs.jsonl"
    short = [{"prompt": f"{i}+1=", "chosen": str(i + 1), "rejected": str(i + 2)} for i in range(4)]
    rows = lines(CASES / "truncation_identical_pair" / "pairs.jsonl") + short
    mixed.write_text("\n".join(json.dumps(r) for r in rows))
    data = ["data=custom_pairs", f"data.source.path={mixed}", f"data.source.eval_path={mixed}", "max_length=50"]
    run = tmp_path / "run"
    overrides = [*data, "trainer.max_steps=1", "batch_size=2", "evaluation.at_start=false", *QUIET]
    result = train(compose(overrides, run))
    summary = json.loads((run / "summary.json").read_text())
    for record in (result, summary):
        assert record["dropped_rows"] == {"train": 12, "eval": 12}
        assert record["dropped_rows_by_reason"] == {
            "train": {"identical_after_truncation": 12},
            "eval": {"identical_after_truncation": 12},
        }


# -- rejected_prompt_mismatch -------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_a_rejected_answer_to_another_prompt_is_refused_naming_the_field(tmp_path, fmt):
    path = CASES / "rejected_prompt_mismatch" / "pairs.jsonl"
    path = path if fmt == "jsonl" else as_parquet(path, tmp_path)
    expected = (
        f"{path}, row 1, field 'rejected': answers another conversation than `chosen` "
        "(message 0 is user '3+3=' where `chosen` has user '2+2='); both answers of a pair must follow the same prompt"
    )
    with pytest.raises(DataError) as err:
        FileSource(str(path)).load("pairwise")
    assert str(err.value) == expected
    with pytest.raises(DataError, match=r"row 1, field 'rejected': answers another conversation"):
        LabelledDataModule(FileSource(str(path)), unpair=True).rows()  # KTO reading the pairs unpaired
    source = FileSource(str(path), eval_fraction=0)
    rows = source.load("pairwise", on_bad_row="skip")["train"]
    assert rows == [{"prompt": [{"role": "user", "content": "1+1="}], "chosen": "2", "rejected": "3"}]
    assert source.skipped == {"train": 1}


# -- empty_messages ------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_empty_message_content_is_refused_and_an_empty_system_message_is_not(tmp_path, fmt):
    path = CASES / "empty_messages" / "pairs.jsonl"
    path = path if fmt == "jsonl" else as_parquet(path, tmp_path)
    with pytest.raises(DataError) as err:
        FileSource(str(path)).load("pairwise")
    assert (
        str(err.value)
        == f"{path}, row 2, field 'prompt': message 0 (user) is empty; only a system message may be empty"
    )
    source = FileSource(str(path), eval_fraction=0)
    rows = source.load("pairwise", on_bad_row="skip")["train"]
    assert rows == [
        {
            "prompt": [{"role": "system", "content": ""}, {"role": "user", "content": "2+2="}],
            "chosen": "4",
            "rejected": "5",
        }
    ]
    assert source.skipped == {"train": 2}  # row 3, whose user message is blank spaces, too


# -- grpo_solution_float -------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["jsonl", "json"])
def test_solutions_reach_the_rows_as_written(tmp_path, fmt):
    path = CASES / "grpo_solution_float" / "prompts.jsonl"
    written = [r["solution"] for r in lines(path)]
    if fmt == "json":
        path = tmp_path / "prompts.json"
        path.write_text(json.dumps(lines(CASES / "grpo_solution_float" / "prompts.jsonl")))
    rows = FileSource(str(path), eval_fraction=0).load("prompt")["train"]
    solutions = [r["solution"] for r in rows]
    assert solutions == written and [type(s) for s in solutions] == [int] * 16 + [float]
    assert rows[11] == {"prompt": [{"role": "user", "content": "2+3="}], "solution": 5}


def one_grpo_step(path: Path, *overrides: str) -> list[str]:
    """One GRPO step (2 two-token completions a prompt) on `path`, held out against itself, in file order."""
    return [
        "algorithm=grpo",
        "data=custom_prompts",
        f"data.source.path={path}",
        f"data.source.eval_path={path}",
        "data.shuffle=false",
        "algorithm.num_generations=2",
        "algorithm.max_completion_length=2",
        "trainer.max_steps=1",
        "evaluation.at_start=false",
        *QUIET,
        *overrides,
    ]


def test_grpo_reward_functions_receive_each_solution_as_written(tmp_path, monkeypatch):
    folder = CASES / "grpo_solution_float"
    record = tmp_path / "seen.jsonl"
    monkeypatch.setenv("RECORD", str(record))
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.delitem(sys.modules, "myrewards", raising=False)  # each case folder has its own `myrewards`
    path = folder / "prompts.jsonl"
    overrides = one_grpo_step(
        path,
        "batch_size=17",
        "eval_batch_size=17",
        "algorithm.num_sample_generations=0",
        "algorithm.reward_funcs=[{_target_: myrewards.record}]",
    )
    train(compose(overrides, tmp_path / "run"))
    seen = lines(record)
    train_seen, eval_seen = seen[:34], seen[34:]
    written = [r["solution"] for r in lines(path)]
    assert [s["solution"] for s in train_seen] == [s for s in written for _ in range(2)]  # 2 completions a prompt
    assert [s["solution"] for s in eval_seen] == written
    assert {(s["solution"], s["type"]) for s in seen} == {(s, type(s).__name__) for s in written}


def test_grpo_sample_tables_carry_each_solution_as_written(tmp_path):
    """samples.jsonl holds each held-out row's extra columns beside its prompt, answer and score,
    with the file's own values: the integer solutions stay integers beside the one 0.5."""
    path = CASES / "grpo_solution_float" / "prompts.jsonl"
    overrides = one_grpo_step(path, "batch_size=4", "algorithm.num_sample_generations=1")
    train(compose(overrides, tmp_path / "run"))
    samples = lines(tmp_path / "run" / "samples.jsonl")
    written = [r["solution"] for r in lines(path)][: len(samples)]
    assert len(samples) == 16 and set(samples[0]) == {"step", "prompt", "answer", "score", "solution"}
    # The prompt as the data's messages (the file's text prompt is one user turn), not the template's text.
    assert [s["prompt"] for s in samples] == [[{"role": "user", "content": r["prompt"]}] for r in lines(path)][:16]
    assert [(s["solution"], type(s["solution"])) for s in samples] == [(w, type(w)) for w in written]
    assert all(type(s["solution"]) is int for s in samples)  # not 5.0: the file's 0.5 is in row 17


# -- rm_margin_partial ---------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["jsonl", "csv", "parquet"])
def test_a_missing_margin_counts_as_zero(tiny, tmp_path, fmt):
    _, tokenizer = tiny
    path = CASES / "rm_margin_partial" / "pairs.jsonl"
    if fmt == "csv":  # a row without a margin is an empty cell
        path, rows = tmp_path / "pairs.csv", lines(path)
        pd.DataFrame(rows).to_csv(path, index=False)
    elif fmt == "parquet":
        path = as_parquet(path, tmp_path)
    dm = datamodule(path, max_length=64, shuffle=False)
    dm.batch_size = 8
    dm.set_tokenizer(tokenizer)
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    assert batch["margin"].tolist() == [2.0, 0.0] * 4


def test_reward_model_trains_on_pairs_where_only_some_rows_carry_a_margin(tmp_path):
    path = CASES / "rm_margin_partial" / "pairs.jsonl"
    data = ["data=custom_pairs", f"data.source.path={path}", f"data.source.eval_path={path}"]
    run = tmp_path / "run"
    result = train(compose(["algorithm=rm", *data, "trainer.max_steps=2", "batch_size=4", *QUIET], run))
    assert result["steps"] == 2 and (run / "summary.json").exists()
