"""An interrupted run resumes exactly: N steps straight equal N/2 steps, a signal, and N/2 resumed steps
(same weights, same metric history), for an offline and an online algorithm; SIGTERM on a real
subprocess writes a checkpoint that resume=auto continues from."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from safetensors.torch import load_file

from alignlab.runner.resume import RunInterrupted
from alignlab.train import train
from tests.conftest import QUIET, ROOT, compose


class SignalAt(L.Callback):
    """Sends this process `signum` once `step` optimizer steps are done (as a scheduler would)."""

    def __init__(self, step: int, signum: int = signal.SIGTERM, marker: str | None = None):
        self.step, self.signum, self.marker = step, signum, marker

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step == self.step:
            if self.marker:  # a subprocess test: tell the test the run is at `step`, let it signal
                Path(self.marker).write_text(str(trainer.global_step))
            else:
                os.kill(os.getpid(), self.signum)


def interrupter(step: int, signum: int = signal.SIGTERM) -> list[str]:
    return [
        f"+callbacks.interrupt._target_={__name__}.SignalAt",
        f"+callbacks.interrupt.step={step}",
        f"+callbacks.interrupt.signum={int(signum)}",
    ]


def history(run_dir: Path) -> dict[tuple[str, int], float]:
    """Every logged (metric, step) → value, whichever row it was written in."""
    out = {}
    with open(run_dir / "metrics.csv") as f:
        for row in csv.DictReader(f):
            for key, value in row.items():
                if value and key not in ("step", "epoch") and not key.startswith("lr-"):
                    out[(key, int(row["step"]))] = float(value)
    return out


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]


CASES = {
    # 40 DPO steps over 2000 pairs in batches of 16: the interruption falls mid-epoch.
    "dpo": ["trainer.max_steps=40", "trainer.val_check_interval=15"],
    # ... and on a step that validates, over 4 held-out batches: the signal arrives before the validation
    # (held until it has seen every batch), and the restart skips it without counting a step twice.
    "dpo-validating": ["trainer.max_steps=20", "trainer.val_check_interval=10", "eval_batch_size=32"],
    # GRPO samples with keys from its step counter, which the checkpoint restores; the length reward
    # varies for the untrained model's answers, so the policy moves.
    "grpo": [
        "algorithm=grpo",
        "algorithm.reward_funcs=[{_target_:alignlab.online.rewards.length_reward,target:4}]",
        "algorithm.max_completion_length=8",
        "batch_size=8",
        "algorithm.num_generations=4",
        "trainer.max_steps=12",
        "trainer.val_check_interval=5",
        "eval_batch_size=64",
        "data.source.n_eval=64",
    ],
    # GKD draws on- or off-policy steps and samples the student's answers with keys from its step counter;
    # the teacher is a noisy copy of the start (given by the test), so the student moves towards it.
    "gkd": [
        "algorithm=gkd",
        "algorithm.max_new_tokens=8",
        "algorithm.seq_kd=true",
        "batch_size=8",
        "trainer.max_steps=10",
        "trainer.val_check_interval=5",
        "evaluation.exact_match=false",
        "data.source.n_eval=16",
    ],
}


# Each algorithm once and each signal once (the signal handling does not depend on the algorithm).
@pytest.mark.parametrize(
    "algorithm, signum",
    [("dpo", signal.SIGTERM), ("grpo", signal.SIGINT), ("gkd", signal.SIGTERM), ("dpo-validating", signal.SIGINT)],
    ids=["dpo-sigterm", "grpo-sigint", "gkd-sigterm", "dpo-validating-sigint"],
)
def test_interrupted_and_resumed_equals_straight(algorithm, signum, tmp_path, tiny_model_dir):
    overrides = [*CASES[algorithm], "trainer.log_every_n_steps=1", "save_model=false", *QUIET]
    if algorithm == "gkd":
        from tests.test_generate import noisy_copy

        teacher = noisy_copy(tiny_model_dir, tmp_path / "teacher", seed=3, std=0.2)
        overrides.append(f"algorithm.teacher_model_name_or_path={teacher}")
    steps = int(next(o for o in overrides if o.startswith("trainer.max_steps=")).split("=")[1])
    straight = train(compose(overrides, tmp_path / "straight"))
    assert straight["steps"] == steps

    run = tmp_path / "interrupted"
    with pytest.raises(RunInterrupted, match=rf"stopped on a signal at step {steps // 2}; .*resume=auto"):
        train(compose([*overrides, *interrupter(steps // 2, signum)], run))
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == steps // 2
    resumed = train(compose([*overrides, "resume=auto"], run))
    assert resumed["steps"] == steps
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["last.ckpt"]  # overwritten, no last-v1.ckpt
    # resume=auto once more, on the finished run: nothing to train, and its summary is kept as it was.
    summary = (run / "summary.json").read_text()
    assert train(compose([*overrides, "resume=auto"], run)) == json.loads(summary)
    assert (run / "summary.json").read_text() == summary
    assert any(k.startswith("train/") for k in json.loads(summary)["metrics"])

    a, b = weights(tmp_path / "straight"), weights(run)
    assert a.keys() == b.keys()
    start = load_file(tiny_model_dir / "model.safetensors")
    assert max((a[f"model.{k}"] - v).abs().max().item() for k, v in start.items()) > 1e-3  # it trained
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-5, atol=1e-6, msg=name)
    straight_history, resumed_history = history(tmp_path / "straight"), history(run)
    train_keys = {k for k in straight_history if k[0].startswith("train/")}
    assert len(train_keys) >= steps  # every step's training metrics were logged
    assert resumed_history.keys() >= straight_history.keys()
    for key, value in straight_history.items():
        if "/timing/" in key[0]:  # wall-clock seconds (e.g. train/timing/reward/<fn>), not a training number
            continue
        assert resumed_history[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key


def test_resume_auto_without_a_checkpoint_starts_fresh_and_a_missing_path_is_an_error(tmp_path):
    from alignlab.errors import ConfigError

    cfg = compose(["trainer.max_steps=3", "trainer.val_check_interval=3", "resume=auto", *QUIET], tmp_path / "a")
    assert train(cfg)["steps"] == 3
    with pytest.raises(ConfigError, match=r"resume=.*nope\.ckpt: no such checkpoint file"):
        train(compose(["resume=" + str(tmp_path / "nope.ckpt"), *QUIET], tmp_path / "b"))


def test_sigterm_on_a_real_run_writes_a_checkpoint_that_resume_auto_continues(tmp_path):
    run, marker = tmp_path / "run", tmp_path / "at-step"
    args = [
        "trainer.max_steps=400",
        "trainer.val_check_interval=400",
        "evaluation.at_start=false",
        f"hydra.run.dir={run}",
        f"+callbacks.mark._target_={__name__}.SignalAt",
        "+callbacks.mark.step=5",
        f"+callbacks.mark.marker={marker}",
        *QUIET,
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "alignlab", *args], cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 300
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert marker.exists(), "the run never reached step 5"
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 1, stderr[-2000:]
    stopped = int(stderr.split("stopped on a signal at step ")[1].split(";")[0])
    assert 5 <= stopped < 400 and "Traceback" not in stderr
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == stopped
    config = (run / "config.yaml").read_text()

    # The same command again without resume is refused before Hydra rewrites the run's .hydra/.
    hydra_files = {p.name: p.read_bytes() for p in (run / ".hydra").iterdir()}
    again = subprocess.run(
        [sys.executable, "-m", "alignlab", *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert again.returncode == 1
    assert again.stderr.strip().splitlines() == [
        f"alignlab: error: the run folder {run} already holds a run (checkpoints/last.ckpt); continue it with "
        "resume=auto, or choose another hydra.run.dir"
    ]
    assert {p.name: p.read_bytes() for p in (run / ".hydra").iterdir()} == hydra_files
    assert {"config.yaml", "overrides.yaml"} <= hydra_files.keys()

    done = stopped + 3
    resumed = subprocess.run(
        [sys.executable, "-m", "alignlab", f"trainer.max_steps={done}", *args[1:4], *QUIET, "resume=auto"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"finished {done} steps" in resumed.stdout
    assert (run / "config.yaml").read_text() == config  # what the first run wrote is kept


def test_a_signal_during_reference_pre_scoring_stops_it_within_a_batch(tmp_path):
    """precompute_ref_log_probs scores every row before the first step; SIGINT there stops as it does
    in training: after the current batch, with a checkpoint and the resume hint."""
    run = tmp_path / "run"
    args = [
        "algorithm.precompute_ref_log_probs=true",
        "batch_size=1",
        "evaluation.at_start=false",
        f"hydra.run.dir={run}",
        *QUIET,
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "alignlab", *args],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    total = None
    for line in proc.stdout:  # 2128 rows one at a time: seconds of scoring to interrupt
        if "rows with the reference model once" in line:
            total = int(line.split(" - scoring ")[1].split()[0])
            proc.send_signal(signal.SIGINT)
            break
    assert total, "pre-scoring never started"
    rest, _ = proc.communicate(timeout=300)
    assert proc.returncode == 1 and "Traceback" not in rest, rest[-2000:]
    scored = int(rest.split("stopped scoring with the reference after ")[1].split(" of ")[0])
    assert scored < total
    assert f"alignlab: error: stopped on a signal at step 0; checkpoint {run / 'checkpoints' / 'last.ckpt'}" in rest
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 0


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_pre_scoring_scores_no_batch_after_the_signal(signum, tmp_path, monkeypatch):
    """The signal arrives while the third batch is scored: that batch ends, no fourth one starts."""
    from alignlab.algorithms.dpo import DPO

    real, calls = DPO.score_reference, []

    def score_and_signal(self, batch):
        calls.append(batch)
        if len(calls) == 3:
            os.kill(os.getpid(), signum)
        return real(self, batch)

    monkeypatch.setattr(DPO, "score_reference", score_and_signal)
    overrides = ["algorithm.precompute_ref_log_probs=true", "batch_size=4", "evaluation.at_start=false", *QUIET]
    with pytest.raises(RunInterrupted, match="stopped on a signal at step 0"):
        train(compose(overrides, tmp_path))
    assert len(calls) == 3
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 0
