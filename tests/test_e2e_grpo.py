"""End to end: GRPO trains the SFT model on a reward it can reach within a test's budget.

The issue's criterion (the `accuracy` reward raising held-out exact match by a clear margin) is not
met on the tiny model yet; see the README's measured results. This test shows the whole loop
(grouped sampling, rewards with data columns, group advantages, clipped update) moving the policy.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from alignlab.train import train
from tests.conftest import compose, from_sft

pytestmark = pytest.mark.slow


def test_grpo_raises_a_reachable_reward_and_logs_its_metrics(sft_run, tmp_path):
    overrides = from_sft(
        sft_run,
        "algorithm=grpo",
        "batch_size=16",
        "trainer.max_steps=40",
        "optim.lr=1e-4",
        "trainer.val_check_interval=40",
        "trainer.log_every_n_steps=2",
        "evaluation.at_start=false",
        "algorithm.reward_funcs=[{_target_: alignlab.rewards.length_reward, target: 1, name: length}]",
    )
    train(compose(overrides, tmp_path))
    with open(tmp_path / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("train/reward")]
    rewards = [float(r["train/reward"]) for r in rows]
    assert sum(rewards[:3]) / 3 < 0.2 and sum(rewards[-3:]) / 3 > 0.8  # one-character answers, learnt
    for name in (
        "reward",
        "reward_std",
        "rewards/length/mean",
        "rewards/length/std",
        "frac_reward_zero_std",
        "clip_ratio/low_mean",
        "clip_ratio/high_mean",
        "clip_ratio/region_mean",
        "completions/mean_length",
        "completions/clipped_ratio",
    ):
        assert rows[-1].get(f"train/{name}"), name
    samples = [json.loads(line) for line in (Path(tmp_path) / "samples.jsonl").read_text().splitlines()]
    assert set(samples[0]) == {"step", "prompt", "answer", "reward"}
