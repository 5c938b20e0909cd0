"""End to end: on-policy distillation (GKD) of a weak tiny student towards the SFT model as its teacher
raises the student's held-out exact match most of the way to the teacher's (see docs/results.md,
Measured results)."""

from __future__ import annotations

import csv

import pytest

from alignlab.train import train
from tests.conftest import QUIET, compose, eval_curve

pytestmark = pytest.mark.slow


def test_gkd_raises_a_students_exact_match_towards_its_teachers(sft_run, tmp_path):
    """The student: the tiny model after a short SFT (300 steps: held-out exact match 0.086, before its
    steep stretch); the teacher: the 800-step SFT model (0.789). 300 GKD steps at TRL's defaults (lmbda
    0.5, beta 0.5, temperature 0.9) took it to 0.734 when measured, its divergence per token from 0.140 to
    0.023. Not that distillation beats the data here: continuing the student's SFT for 300 steps reached
    0.797 (the data's answers are all right, the teacher's 79%), and lmbda 0 (the data's answers only)
    0.742."""
    start = train(
        compose(
            ["algorithm=sft", "batch_size=32", "trainer.max_steps=300", "trainer.val_check_interval=300", *QUIET],
            tmp_path / "student",
        )
    )
    overrides = [
        "algorithm=gkd",
        f"algorithm.teacher_model_name_or_path={sft_run['model_dir']}",
        f"model.path={start['model_dir']}",
        "model.tiny=null",
        "algorithm.max_new_tokens=4",
        "batch_size=32",
        "trainer.max_steps=300",
        "trainer.val_check_interval=300",
        *QUIET,
    ]
    result = train(compose(overrides, tmp_path / "gkd"))
    teacher = sft_run["metrics"]["eval/exact_match"]
    curve = eval_curve(tmp_path / "gkd", "eval/exact_match")
    before, after = curve[0][1], result["metrics"]["eval/exact_match"]
    assert before == start["metrics"]["eval/exact_match"] < 0.2 < 0.7 < teacher  # a weak student, a good teacher
    assert after > 0.6 and teacher - after < (teacher - before) / 3  # two thirds of the gap closed, at least
    divergence = eval_curve(tmp_path / "gkd", "eval/loss")
    assert divergence[-1][1] < divergence[0][1] / 3  # the teacher's distributions, learnt
    with open(tmp_path / "gkd" / "metrics.csv") as f:
        draws = [float(r["train/on_policy"]) for r in csv.DictReader(f) if r.get("train/on_policy")]
    assert 0.3 < sum(draws) / len(draws) < 0.7  # about lmbda of the steps sampled by the student
