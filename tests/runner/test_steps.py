"""A run that would take no optimizer step stops before it writes anything (issue 32 item 7: GRPO with
fewer usable prompts than batch_size printed "finished 0 steps" and exited 0)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from omegaconf import OmegaConf

from alignlab.errors import ConfigError
from alignlab.runner.steps import check_optimizer_steps, check_trainer_steps, expected_processes
from alignlab.train import train
from tests.conftest import QUIET, compose


def datamodule(kept: int, batch_size: int, drop_last: bool, read: int | None = None, dropped: int = 0):
    """What check_optimizer_steps reads of a set-up DataModule: `kept` usable train rows of `read`."""
    rows = [{"index": i} for i in range(kept)]
    return SimpleNamespace(
        stream=None,
        stream_usable_rows=None,
        splits={"train": rows},
        drop_last_train=drop_last,
        batch_size=batch_size,
        max_tokens_per_micro_batch=None,
        max_length=128,
        dropped={"train": dropped},
        dropped_by_reason={"train": {"prompt_too_long": dropped}} if dropped else {"train": {}},
        skipped={},
        read=lambda: {"train": [{}] * (kept + dropped if read is None else read)},
    )


def config(name: str = "grpo", **trainer):
    return OmegaConf.create({"algorithm": {"name": name}, "trainer": {"devices": 1, "num_nodes": 1, **trainer}})


@pytest.mark.parametrize("key", ["max_steps", "max_epochs", "limit_train_batches"])
def test_a_trainer_told_to_take_no_step_is_refused_by_key(key):
    with pytest.raises(ConfigError, match=f"trainer.{key}=0 allows no"):
        check_trainer_steps(OmegaConf.create({key: 0}))
    check_trainer_steps(OmegaConf.create({"max_steps": -1, "max_epochs": 1, "limit_train_batches": 1.0}))


def test_fewer_usable_prompts_than_batch_size_are_refused_naming_batch_size_and_rows():
    with pytest.raises(ConfigError) as err:
        check_optimizer_steps(config(), datamodule(kept=3, batch_size=4, drop_last=True, dropped=2))
    message = str(err.value)
    assert "the run would take no optimizer step" in message
    assert "3 usable training rows of 5 read; 2 left out at max_length=128 (2 prompt_too_long)" in message
    assert "algorithm=grpo takes batch_size=4 rows" in message
    assert "lower batch_size to 3 or less" in message and "raise max_length" in message
    check_optimizer_steps(config(), datamodule(kept=4, batch_size=4, drop_last=True))  # one step: runs


def test_every_process_needs_its_share_of_the_batch(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(ConfigError, match=r"batch_size=4 × 2 processes rows .*lower batch_size to 3 or less"):
        check_optimizer_steps(config(devices=2), datamodule(kept=7, batch_size=4, drop_last=True))
    # an offline algorithm trains on a short last batch: one row per process is enough
    check_optimizer_steps(config("dpo", devices=2), datamodule(kept=2, batch_size=16, drop_last=False))
    with pytest.raises(ConfigError, match="takes one row × 2 processes rows"):
        check_optimizer_steps(config("dpo", devices=2), datamodule(kept=1, batch_size=16, drop_last=False))


def test_expected_processes(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    trainer = lambda **kw: OmegaConf.create({"accelerator": "cpu", "num_nodes": 1, **kw})  # noqa: E731
    assert expected_processes(trainer(devices=1)) == 1
    assert expected_processes(trainer(devices=2, num_nodes=3)) == 6
    assert expected_processes(trainer(devices=[0, 1])) == 2
    assert expected_processes(trainer(devices="0,1,2")) == 3
    assert expected_processes(trainer(devices="auto")) == 1  # not known: a lower bound, never a false refusal
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert expected_processes(trainer(devices=-1)) == 4


def test_a_grpo_run_with_too_few_prompts_stops_before_writing(tmp_path):
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{i}+1=", "solution": str(i + 1)}) + "\n" for i in range(3)))
    run = tmp_path / "run"
    overrides = [
        "algorithm=grpo",
        "data=custom_prompts",
        f"data.source.path={data}",
        "data.source.eval_fraction=0",
        "batch_size=4",
        *QUIET,
    ]
    with pytest.raises(ConfigError, match=r"3 usable training rows, and one optimizer step of algorithm=grpo takes "):
        train(compose(overrides, run))
    assert not (run / "config.yaml").exists() and not (run / "checkpoints").exists()
