"""End to end: GRPO from the SFT model. A reward it can reach quickly (answer length) shows the whole
loop (grouped sampling, rewards, group advantages, clipped update) moving the policy; the `accuracy`
reward raises held-out exact match (see docs/results.md, Measured results)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from alignlab.train import train
from tests.conftest import compose, eval_curve, from_sft

pytestmark = pytest.mark.slow

# GRPO with the `accuracy` reward from the SFT start; tests/e2e/test_e2e_grpo_variants.py runs the
# field's variants on the same recipe.
ACCURACY_RECIPE = [
    "algorithm=grpo",
    "batch_size=64",
    "optim.lr=3e-4",
    "trainer.max_steps=160",
    "trainer.val_check_interval=160",
    "trainer.log_every_n_steps=10",
    "algorithm.num_sample_generations=0",
]


def test_grpo_raises_a_reachable_reward_and_logs_its_metrics(sft_run, tmp_path):
    overrides = from_sft(
        sft_run,
        "algorithm=grpo",
        "batch_size=16",
        "trainer.max_steps=60",  # 40 ends still climbing on some CPUs' summation order (0.73 over the last 3 steps)
        "optim.lr=1e-4",
        "trainer.val_check_interval=60",
        "trainer.log_every_n_steps=2",
        "evaluation.at_start=false",
        "algorithm.reward_funcs=[{_target_: alignlab.online.rewards.length_reward, target: 1, name: length}]",
    )
    train(compose(overrides, tmp_path))
    with open(tmp_path / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("train/reward")]
    rewards = [float(r["train/reward"]) for r in rows]
    assert sum(rewards[:3]) / 3 < 0.2 and sum(rewards[-3:]) / 3 > 0.8  # one-character answers, learnt
    for name in (
        "loss",
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
    assert set(samples[0]) == {"step", "prompt", "answer", "score", "solution"}
    assert all(m.keys() == {"role", "content"} for s in samples for m in s["prompt"])  # the data's messages


@pytest.mark.long  # tuned on a 0.789 SFT start; where the CPU gives another (0.867 on AMD EPYC), see docs/results.md
def test_grpo_with_the_accuracy_reward_raises_held_out_exact_match(sft_run, tmp_path):
    """The issue's criterion: SFT, then GRPO with the `accuracy` reward, raises held-out exact match.

    64 prompts × 8 completions per step at lr 3e-4: smaller batches' noisy updates first knock the
    SFT model's borderline answers over (see docs/results.md), larger ones climb from the start."""
    train(compose(from_sft(sft_run, *ACCURACY_RECIPE), tmp_path))
    start, end = (value for _, value in eval_curve(tmp_path, "eval/exact_match"))
    print(f"held-out exact match {start:.3f} -> {end:.3f}")
    assert end >= start + 0.04, (start, end)  # 5 or more of the 128 held-out problems newly right
    with open(tmp_path / "metrics.csv") as f:
        rewards = [float(r["train/reward"]) for r in csv.DictReader(f) if r.get("train/reward")]
    assert sum(rewards[-4:]) / 4 > sum(rewards[:4]) / 4 + 0.1  # sampled answers right more often
