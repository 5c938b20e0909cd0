"""A run folder says how its training ended: a run that fails during training keeps its folder and
checkpoints, marked FAILED with the error; one stopped by a signal is marked INTERRUPTED and loses
the mark once resumed to the end; alignlab.results reports each as its `status`."""

from __future__ import annotations

import pytest
from lightning.pytorch.utilities.exceptions import SIGTERMException

from alignlab.algorithms.base import AlignmentModule
from alignlab.results import SweepError, load_sweep
from alignlab.runner.resume import RunInterrupted
from alignlab.train import train
from tests.conftest import QUIET, compose

SHORT = ["callbacks.checkpoint.every_n_train_steps=2", "evaluation.at_start=false", "save_model=false", *QUIET]


def stop_at_step(monkeypatch, step: int, error: BaseException) -> None:
    """Every algorithm's training step raises `error` once the trainer reaches `step`."""
    real = AlignmentModule.training_step

    def training_step(self, batch, batch_idx):
        if self.trainer.global_step == step:
            raise error
        return real(self, batch, batch_idx)

    monkeypatch.setattr(AlignmentModule, "training_step", training_step)


def test_an_error_during_training_leaves_the_folder_with_its_checkpoints_marked_failed(tmp_path, monkeypatch):
    stop_at_step(monkeypatch, 3, RuntimeError("boom"))
    with pytest.raises(RuntimeError, match="boom"):
        train(compose(["trainer.max_steps=6", "trainer.val_check_interval=6", *SHORT], tmp_path))
    assert (tmp_path / "FAILED").read_text() == "failed at step 3: RuntimeError: boom\n"
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file() and (tmp_path / "config.yaml").is_file()
    assert not (tmp_path / "summary.json").exists() and not (tmp_path / "INTERRUPTED").exists()
    with pytest.raises(SweepError, match=r"1 of 1 runs .* have not finished: \S+ \(failed\)"):
        load_sweep(tmp_path)
    run = load_sweep(tmp_path, allow_unfinished=True).iloc[0]
    assert run["status"] == "failed" and not run["finished"]


def test_a_signal_marks_the_folder_interrupted_until_the_run_is_resumed_to_its_end(tmp_path, monkeypatch):
    with monkeypatch.context() as patch:
        stop_at_step(patch, 3, SIGTERMException())  # what Lightning raises on SIGTERM, at a batch boundary
        with pytest.raises(RunInterrupted, match="stopped on a signal at step 3"):
            train(compose(["trainer.max_steps=5", "trainer.val_check_interval=5", *SHORT], tmp_path))
    assert (tmp_path / "INTERRUPTED").read_text().startswith("interrupted at step 3: RunInterrupted: stopped on")
    assert not (tmp_path / "FAILED").exists()
    assert load_sweep(tmp_path, allow_unfinished=True)["status"].tolist() == ["interrupted"]

    result = train(compose(["trainer.max_steps=5", "trainer.val_check_interval=5", "resume=auto", *SHORT], tmp_path))
    assert result["steps"] == 5 and not (tmp_path / "INTERRUPTED").exists()
    assert load_sweep(tmp_path)["status"].tolist() == ["finished"]


def test_a_run_that_fails_before_training_leaves_no_folder_and_one_that_began_keeps_its_own(tmp_path, monkeypatch):
    """`python -m alignlab` removes the folder Hydra made for a run that stopped before training
    (tests/runner/test_config.py runs it end to end); never a folder that training wrote into, nor the
    working directory."""
    from alignlab.runner.sweeps import discard_unstarted_run, holds_only_hydra_files, is_first_process

    def hydra_folder(name: str, *more: str):
        folder = tmp_path / name
        (folder / ".hydra").mkdir(parents=True)
        (folder / ".hydra" / "overrides.yaml").write_text("- data=custom_pairs\n")
        (folder / "alignlab.log").write_text("")
        for other in more:
            (folder / other).mkdir()
        return folder

    fresh = hydra_folder("fresh")
    assert holds_only_hydra_files(fresh) and discard_unstarted_run(fresh) and not fresh.exists()
    for marks in (["checkpoints"], ["FAILED"], ["INTERRUPTED"], ["summary.json"]):
        began = hydra_folder("began-" + marks[0], *marks)
        assert not holds_only_hydra_files(began) and not discard_unstarted_run(began) and began.exists()
    here = hydra_folder("here")
    monkeypatch.chdir(here)  # hydra.run.dir=. : the working directory is never removed
    assert not discard_unstarted_run(here) and (here / ".hydra").is_dir()
    assert is_first_process()
    monkeypatch.setenv("LOCAL_RANK", "1")  # a DDP worker shares rank 0's folder: it never removes it
    assert not is_first_process()
