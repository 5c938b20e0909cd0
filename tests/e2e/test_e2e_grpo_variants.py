"""End to end: the field's GRPO variants, each from the shared SFT start with the `accuracy` reward,
raise held-out exact match as plain GRPO does (tests/e2e/test_e2e_grpo.py; same recipe: 64 prompts × 8
completions per step, lr 3e-4, 160 steps; the numbers are in docs/results.md)."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from alignlab.train import train
from tests.conftest import compose, eval_curve, from_sft
from tests.e2e.test_e2e_grpo import ACCURACY_RECIPE

pytestmark = [pytest.mark.slow, pytest.mark.long]  # 5 CPU minutes: outside the default suite (-m long)

RECIPE = ACCURACY_RECIPE


def held_out_gain(run_dir: Path) -> tuple[float, float]:
    start, end = (value for _, value in eval_curve(run_dir, "eval/exact_match"))
    print(f"held-out exact match {start:.3f} -> {end:.3f}")
    return start, end


def train_metric(run_dir: Path, name: str) -> list[float]:
    with open(Path(run_dir) / "metrics.csv") as f:
        return [float(r[name]) for r in csv.DictReader(f) if r.get(name)]


def test_gspo_raises_held_out_exact_match(sft_run, tmp_path):
    """GSPO (Zheng et al. 2025): one length-normalised importance ratio per completion.
    Measured 0.789 → 0.836 from the 800-step SFT start."""
    train(compose(from_sft(sft_run, *RECIPE, "algorithm.importance_sampling_level=sequence"), tmp_path))
    start, end = held_out_gain(tmp_path)
    assert end >= start + 0.03, (start, end)  # 4 or more of the 128 held-out problems newly right
    rewards = train_metric(tmp_path, "train/reward")
    assert sum(rewards[-4:]) / 4 > sum(rewards[:4]) / 4 + 0.1  # sampled answers right more often


def test_rloo_with_dynamic_sampling_raises_held_out_exact_match(sft_run, tmp_path):
    """RLOO advantages (Ahmadian et al. 2024) on DAPO's dynamic sampling (Yu et al. 2025): groups whose
    answers all score the same are replaced by fresh prompts. Measured 0.789 → 0.875."""
    overrides = [*RECIPE, "algorithm.advantage_estimator=rloo", "algorithm.dynamic_sample=true"]
    train(compose(from_sft(sft_run, *overrides), tmp_path))
    start, end = held_out_gain(tmp_path)
    assert end >= start + 0.05, (start, end)
    # Every first draw held groups whose answers all scored the same (measured 13-28% of them), so
    # every step sampled again to replace them (the unit tests show no such group is trained).
    assert min(train_metric(tmp_path, "train/frac_reward_zero_std")) > 0
    assert min(train_metric(tmp_path, "train/num_resamples")) >= 1
