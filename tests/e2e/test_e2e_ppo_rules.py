"""End to end: PPO with a rule reward (`reward_funcs=[accuracy]`) and no reward model, from the shared
SFT start: the value model is the policy's copy under a new head, and held-out exact match rises
(docs/results.md, measured 0.789 → 0.836)."""

from __future__ import annotations

import csv
import statistics
from pathlib import Path

import pytest

from alignlab.train import train
from tests.conftest import compose, eval_curve, from_sft

pytestmark = pytest.mark.slow

# 100 rollouts of 256 prompts, one optimizer step each, sampled at temperature 1 (at PPO's default 0.7
# most sampled answers are already right, so the binary reward carries less signal) and lr 3e-4.
PPO_RULES = [
    "algorithm=ppo",
    "algorithm.reward_funcs=[accuracy]",
    "algorithm.reward_model=null",
    "algorithm.temperature=1.0",
    "algorithm.num_ppo_epochs=1",
    "algorithm.num_mini_batches=1",
    "algorithm.num_sample_generations=0",
    "batch_size=256",
    "optim.lr=3e-4",
    "trainer.max_steps=100",
    "trainer.val_check_interval=100",
    "trainer.log_every_n_steps=10",
]


@pytest.mark.long  # tuned on a 0.789 SFT start; where the CPU gives another (0.867 on AMD EPYC), see docs/results.md
def test_ppo_with_the_accuracy_rule_raises_held_out_exact_match(sft_run, tmp_path):
    train(compose(from_sft(sft_run, *PPO_RULES), tmp_path))
    start, end = (value for _, value in eval_curve(tmp_path, "eval/exact_match"))
    print(f"held-out exact match {start:.3f} -> {end:.3f}")
    assert end >= start + 0.03, (start, end)  # 4 or more of the 128 held-out problems newly right
    with open(Path(tmp_path) / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("train/objective/scores")]
    scores = [float(r["train/objective/scores"]) for r in rows]
    # The score is the rule's alone (no reward model): the sampled answers' share right, measured
    # 0.50 → 0.68 over the run.
    assert [float(r["train/rewards/accuracy/mean"]) for r in rows] == pytest.approx(scores)
    assert statistics.mean(scores[-3:]) > statistics.mean(scores[:3]) + 0.1
