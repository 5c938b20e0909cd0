"""Runs that go wrong stop cleanly: a non-finite loss stops training before it reaches the weights,
with a message naming the step and the metric, and the checkpoints already written stay good; a reward
function that returns NaN stops the run before the step, naming itself and the row; data with no
held-out rows trains without validation and says so once."""

from __future__ import annotations

import json
import logging
import sys

import pytest
import torch

from alignlab.errors import NonFiniteLossError
from alignlab.online.rewards import RewardFunctionError
from alignlab.train import train
from tests.conftest import CASES, QUIET, compose

needs_cases = pytest.mark.skipif(not CASES.is_dir(), reason=f"the shared failing inputs are not at {CASES}")


def test_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    from alignlab.algorithms import dpo

    real, calls = dpo.dpo_loss, {"train": 0}

    def poisoned(*args, **kwargs):  # the loss turns NaN at the fifth training step (global step 4)
        out = real(*args, **kwargs)
        if torch.is_grad_enabled():
            calls["train"] += 1
            if calls["train"] == 5:
                return out._replace(losses=out.losses * float("nan"))
        return out

    monkeypatch.setattr(dpo, "dpo_loss", poisoned)
    cfg = compose(
        [
            "trainer.max_steps=10",
            "callbacks.checkpoint.every_n_train_steps=2",
            "evaluation.at_start=false",
            "trainer.val_check_interval=10",
            *QUIET,
        ],
        tmp_path,
    )
    expected = r"train/loss is nan at step 4: .*last good checkpoint is .*last\.ckpt"
    with pytest.raises(NonFiniteLossError, match=expected):
        train(cfg)
    checkpoint = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert checkpoint["global_step"] == 4  # written after step 4, not overwritten by the failed step
    assert all(torch.isfinite(v).all() for v in checkpoint["state_dict"].values())
    assert (tmp_path / "config.yaml").exists() and not (tmp_path / "model").exists()


def test_non_finite_loss_is_caught_under_manual_optimisation_too(tiny):
    """PPO and GRPO step their optimizer themselves: the check sits before their backward as well."""
    from tests.conftest import build_module

    model, tokenizer = tiny
    module = build_module("grpo", model, tokenizer)
    with pytest.raises(NonFiniteLossError, match=r"train/loss is inf at step 0"):
        module.backpropagate(torch.tensor(float("inf"), requires_grad=True))


NO_VALIDATION = "no held-out rows ({why}), so this run trains without validation and reports no eval/ metrics"


@needs_cases
@pytest.mark.parametrize(
    ("data", "why"),
    [
        (
            ["data.source.path={cases}/eval_split_empty/pairs.jsonl", "data.source.eval_fraction=0"],
            "data.source.eval_fraction=0",
        ),
        (["data.source.path={cases}/eval_split_empty/one_row.jsonl"], "the data has one row"),
    ],
    ids=["eval_fraction=0", "one_row"],
)
def test_no_held_out_rows_trains_without_validation_and_says_so_once(data, why, tmp_path, caplog):
    data = [d.format(cases=CASES) for d in data]
    with caplog.at_level(logging.WARNING, logger="alignlab.train"):
        result = train(compose(["data=custom_pairs", *data, "trainer.max_steps=3", "batch_size=4", *QUIET], tmp_path))
    said = [r.getMessage() for r in caplog.records if "no held-out rows" in r.getMessage()]
    assert len(said) == 1 and said[0].startswith(NO_VALIDATION.format(why=why))
    assert result["steps"] == 3
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["metrics"]["train/loss"] > 0
    assert [k for k in summary["metrics"] if not k.startswith("train/")] == []  # no eval metrics at all


@needs_cases
def test_grpo_without_held_out_prompts_trains_and_writes_no_sample_table(tmp_path):
    """PPO and GRPO sample tables answer held-out prompts: without any, there is none to write."""
    overrides = [
        "algorithm=grpo",
        "data=custom_prompts",
        f"data.source.path={CASES}/eval_split_empty/pairs.jsonl",
        "data.source.eval_fraction=0",
        "algorithm.reward_funcs=[{_target_:alignlab.online.rewards.length_reward,target:4}]",
        "algorithm.max_completion_length=4",
        "algorithm.num_generations=2",
        "batch_size=4",
        "trainer.max_steps=2",
        *QUIET,
    ]
    result = train(compose(overrides, tmp_path))
    assert result["steps"] == 2 and "train/loss" in result["metrics"]
    assert not [k for k in result["metrics"] if k.startswith("eval/")]
    assert not (tmp_path / "samples.jsonl").exists()


@needs_cases
def test_a_reward_function_returning_nan_stops_before_the_step_naming_itself_and_the_row(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(CASES / "grpo_reward_nan"))  # the user's module `myrewards`
    monkeypatch.delitem(sys.modules, "myrewards", raising=False)  # each case folder has its own `myrewards`
    overrides = [
        "algorithm=grpo",
        "data=custom_prompts",
        f"data.source.path={CASES}/grpo_reward_nan/prompts.jsonl",
        "data.shuffle=false",
        "algorithm.reward_funcs=[{_target_:myrewards.sometimes_nan}]",
        "algorithm.max_completion_length=4",
        "algorithm.num_generations=2",
        "batch_size=4",
        "trainer.max_steps=2",
        "evaluation.at_start=false",
        *QUIET,
    ]
    with pytest.raises(RewardFunctionError) as err:
        train(compose(overrides, tmp_path))
    message = str(err.value)
    # sometimes_nan returns NaN for the first completion of each call: the first prompt's first answer
    assert message.startswith("reward function 'sometimes_nan' returned nan for completion 1 of 8, the answer ")
    assert "to the data row whose prompt is '" in message and "a reward must be a finite number" in message
    prompts = [json.loads(line)["prompt"] for line in (CASES / "grpo_reward_nan" / "prompts.jsonl").open()]
    assert message.split("whose prompt is '")[1].split("'")[0] in prompts
    assert not (tmp_path / "checkpoints" / "last.ckpt").exists() and not (tmp_path / "model").exists()
