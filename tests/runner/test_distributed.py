"""Data parallel on CPU (2 processes, gloo) gives the run one process gives with the same global
batch: same weights and the same logged metrics, for an offline (DPO) and an online (GRPO) algorithm."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import run_cli

pytestmark = pytest.mark.slow


def single_and_ddp(tmp_path: Path, overrides: list[str], batch_size: int) -> tuple[Path, Path]:
    """The same run on one process (global batch) and on two (half each)."""
    common = [*overrides, "logger=csv", "trainer.enable_progress_bar=false", "trainer.log_every_n_steps=1"]
    runs = {
        "single": [f"batch_size={batch_size}", "eval_batch_size=64"],
        "ddp": ["hardware=ddp_cpu", f"batch_size={batch_size // 2}", "eval_batch_size=32"],
    }
    for name, extra in runs.items():
        out = run_cli([*common, *extra, f"hydra.run.dir={tmp_path / name}"], cwd=tmp_path)
        assert out.returncode == 0, out.stderr[-3000:]
    return tmp_path / "single", tmp_path / "ddp"


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "model" / "model.safetensors")


def logged(run: Path, names: list[str]) -> dict[tuple[str, int], float]:
    with open(run / "metrics.csv") as f:
        return {(n, int(r["step"])): float(r[n]) for r in csv.DictReader(f) for n in names if r.get(n)}


def assert_same_run(single: Path, ddp: Path, start: dict, metrics: list[str]) -> None:
    a, b = weights(single), weights(ddp)
    moved = max((a[k] - start[k]).abs().max().item() for k in a)
    apart = max((a[k] - b[k]).abs().max().item() for k in a)
    assert apart < 1e-5 and moved > 1000 * apart, (apart, moved)
    history, other = logged(single, metrics), logged(ddp, metrics)
    assert history.keys() == other.keys() and {n for n, _ in history} == set(metrics)
    for key, value in history.items():
        assert other[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key


def test_dpo_on_two_processes_matches_one_process(tmp_path, tiny_model_dir):
    single, ddp = single_and_ddp(tmp_path, ["trainer.max_steps=6", "trainer.val_check_interval=3"], batch_size=8)
    metrics = ["train/loss", "train/rewards/margins", "train/rewards/accuracies", "eval/loss", "eval/exact_match"]
    assert_same_run(single, ddp, load_file(tiny_model_dir / "model.safetensors"), metrics)


def test_grpo_on_two_processes_matches_one_process(tmp_path, tiny_model_dir):
    """Sampling is keyed on the data row (alignlab.online.generation), so both runs sample the same answers;
    the reward (answers close to 4 characters) varies even for the untrained model."""
    overrides = [
        "algorithm=grpo",
        "trainer.max_steps=4",
        "trainer.val_check_interval=2",
        "algorithm.num_generations=4",
        "algorithm.beta=0.04",
        "algorithm.max_completion_length=8",
        "algorithm.reward_funcs=[{_target_:alignlab.online.rewards.length_reward,target:4}]",
        "evaluation.exact_match=false",
    ]
    single, ddp = single_and_ddp(tmp_path, overrides, batch_size=8)
    metrics = [
        "train/reward",
        "train/reward_std",
        "train/kl",
        "train/rewards/length_reward/std",
        "train/clip_ratio/region_mean",
        "train/completions/mean_length",
        "eval/reward",
    ]
    assert_same_run(single, ddp, load_file(tiny_model_dir / "model.safetensors"), metrics)


def test_every_algorithm_trains_under_ddp_with_identical_weights_on_every_process(tmp_path):
    """Every algorithm, 2 processes under torchrun: training changes the weights, and both processes
    end with the same weights (DDP reduced every gradient) and report the same final metrics."""
    import json
    import os
    import subprocess
    import sys

    from tests.conftest import ROOT
    from tests.runner.ddp_every_algorithm import ALGORITHMS

    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    script = ROOT / "tests" / "runner" / "ddp_every_algorithm.py"
    out = subprocess.run([*command, str(script), str(tmp_path)], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    for name in ALGORITHMS:
        ranks = [json.loads((tmp_path / f"{name}.rank{r}.json").read_text()) for r in (0, 1)]
        start, end = ranks[0]["start"], ranks[0]["end"]
        assert ranks[1]["start"] == start, name  # both start from the same weights
        moved = max(abs(a - b) for k in end for a, b in zip(end[k], start[k]))
        apart = max(abs(a - b) for k in end for a, b in zip(end[k], ranks[1]["end"][k]))
        assert moved > 1e-3 and apart <= 1e-9 * moved, (name, moved, apart)
        metrics = [json.loads((tmp_path / f"{name}.result.rank{r}.json").read_text()) for r in (0, 1)]
        # each process's own wall-clock seconds (train/timing/reward/<fn>) are not a training number
        metrics = [{k: v for k, v in m.items() if "/timing/" not in k} for m in metrics]
        assert metrics[0] and metrics[0] == metrics[1], name
        assert all(math.isfinite(v) for v in metrics[0].values()), name
