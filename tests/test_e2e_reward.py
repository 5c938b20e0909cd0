"""End to end: a reward model trained after SFT separates right sums from wrong ones on unseen prompts."""

from __future__ import annotations

from pathlib import Path

import pytest

from alignlab.data.arith import ArithTask
from alignlab.models.reward import VALUE_HEAD_FILE
from alignlab.score import RewardScorer
from tests.conftest import eval_curve

pytestmark = pytest.mark.slow


def test_reward_model_held_out_accuracy_is_well_above_chance(rm_run):
    curve = eval_curve(rm_run["run_dir"], "eval/accuracy")
    assert curve[-1][1] > 0.8  # chance is 0.5
    assert curve[-1][1] > curve[0][1] + 0.2
    assert rm_run["metrics"]["eval/margin"] > 0
    assert (
        rm_run["metrics"]["eval/reward/min"]
        < rm_run["metrics"]["eval/reward/mean"]
        < rm_run["metrics"]["eval/reward/max"]
    )


def test_reward_model_ranks_right_answers_above_wrong_ones_on_unseen_prompts(rm_run):
    """Scored outside training, with the scorer, on held-out prompts: wrong answers off by 1 to 9, and
    carry slips off by exactly ±10 (which keep the ones digit; data=arith_slips puts them in training)."""
    folder = Path(rm_run["model_dir"])
    assert (folder / VALUE_HEAD_FILE).exists()
    scorer = RewardScorer(folder)
    held_out = ArithTask().load("pairwise")["eval"]  # prompts never in the training split
    prompts = [r["prompt"] for r in held_out]
    right = scorer.score(prompts, [r["chosen"] for r in held_out])
    wrong = scorer.score(prompts, [r["rejected"] for r in held_out])
    assert sum(r > w for r, w in zip(right, wrong)) / len(held_out) > 0.85
    for slip in (10, -10):
        rows = [i for i, r in enumerate(held_out) if int(r["chosen"]) + slip >= 0]
        slipped = scorer.score([prompts[i] for i in rows], [str(int(held_out[i]["chosen"]) + slip) for i in rows])
        assert sum(right[i] > w for i, w in zip(rows, slipped)) / len(rows) > 0.85, slip
