"""GRPO's loss variants wired through the module: their config checks, the update's step-wide entropy
quantile and entropy bonus, and a short run through train() (the math: tests/losses/test_grpo_variants.py)."""

from __future__ import annotations

import copy

import pytest
import torch

from alignlab.errors import ConfigError
from alignlab.runner.config import check_config
from alignlab.train import train
from tests.algorithms.test_grpo import length_rewarded_generation, updated
from tests.conftest import QUIET, compose


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["algorithm.importance_sampling_level=sentence"], "algorithm.importance_sampling_level must be one of"),
        (["algorithm.loss_type=vespo"], "algorithm.loss_type must be one of"),
        (["algorithm.loss_type=dapoo"], "got 'dapoo' (did you mean dapo?)"),  # the registry's closest name
        (
            ["algorithm.importance_sampling_level=sequence.token"],
            "must be one of ('token', 'sequence', 'sequence_token')",
        ),
        (["algorithm.top_entropy_quantile=1.5"], "algorithm.top_entropy_quantile must be in [0.0, 1.0], got 1.5"),
        (["algorithm.top_entropy_quantile=-0.1"], "algorithm.top_entropy_quantile must be in [0.0, 1.0]"),
        (["algorithm.entropy_coef=-0.01"], "algorithm.entropy_coef must be >= 0, got -0.01"),
        (["algorithm.sapo_temperature_pos=0"], "algorithm.sapo_temperature_pos must be > 0, got 0"),
        (["algorithm.sapo_temperature_neg=-1.0"], "algorithm.sapo_temperature_neg must be > 0"),
        (
            ["algorithm.loss_type=cispo"],
            "algorithm.loss_type=cispo caps the importance weight at algorithm.epsilon_high",
        ),
        (["algorithm.delta=1.2"], "algorithm.delta must be > 1 + epsilon_high = 1.2 (so it caps only the ratios of"),
        (["algorithm.delta=1.25", "algorithm.epsilon_high=0.28"], "algorithm.delta must be > 1 + epsilon_high = 1.28"),
        (["algorithm.delta=-2"], "algorithm.delta must be > 0"),
        (["algorithm.off_policy_mask_threshold=-0.5"], "algorithm.off_policy_mask_threshold must be >= 0, got -0.5"),
        (
            ["algorithm.delta=2.0", "algorithm.loss_type=sapo"],
            "algorithm.delta (two-sided clipping) applies to the clipped loss types",
        ),
    ],
)
def test_grpo_variant_config_errors_name_the_key(overrides, message, tmp_path):
    with pytest.raises(ConfigError) as err:
        check_config(compose(["algorithm=grpo", *overrides], tmp_path))
    assert message in str(err.value)


def test_grpo_variant_settings_pass_the_checks(tmp_path):
    for overrides in (
        ["algorithm.loss_type=cispo", "algorithm.epsilon_high=5.0", "algorithm.importance_sampling_level=sequence"],
        ["algorithm.loss_type=sapo", "algorithm.importance_sampling_level=sequence_token"],
        ["algorithm.delta=1.5", "algorithm.top_entropy_quantile=0.2", "algorithm.entropy_coef=0.01"],
    ):
        check_config(compose(["algorithm=grpo", *overrides], tmp_path))


def test_the_high_entropy_tokens_and_the_entropy_bonus_are_the_whole_steps_however_cut(tiny):
    """top_entropy_quantile < 1: the quantile is over every token of the optimizer step, so the step
    cut by a token budget takes the weights (two steps, float64) of the whole batch at once; the
    entropy bonus changes the step (it carries gradients); sequence-level ratios go along."""
    whole, gen = length_rewarded_generation(
        tiny,
        torch.float64,
        num_iterations=2,
        max_tokens_per_micro_batch=None,
        importance_sampling_level="sequence",
        top_entropy_quantile=0.5,
        entropy_coef=0.05,
    )
    split, plain = copy.deepcopy(whole), copy.deepcopy(whole)
    split.max_tokens_per_micro_batch = 3 * int(gen["attention_mask"].sum(1).max())
    assert len(split.micro_batches(gen["attention_mask"])) >= 3
    plain.entropy_coef = 0.0
    kept = whole.high_entropy_tokens(gen, whole.micro_batches(gen["attention_mask"]))
    assert 0 < kept.sum() < gen["mask"].sum() and (kept <= gen["mask"]).all()
    logged = updated((whole, split, plain), gen)
    for key, value in logged[0].items():
        assert logged[1][key].item() == pytest.approx(value.item(), rel=1e-10, abs=1e-12), key
    for (name, a), b in zip(whole.model.named_parameters(), split.model.parameters()):
        torch.testing.assert_close(b, a, atol=1e-12, rtol=1e-10, msg=name)
    assert not torch.equal(whole.model.lm_head.weight, plain.model.lm_head.weight)  # the bonus moved the step
    assert {"entropy", "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean"} <= logged[0].keys()


def test_a_short_gspo_cispo_run_wires_the_keys(tmp_path, monkeypatch):
    """train() with importance_sampling_level=sequence, loss_type=cispo, top_entropy_quantile and
    entropy_coef: grpo_loss receives them and the run logs cispo_clip_ratio and entropy (TRL's names),
    not the clipped loss types' clip_ratio/*."""
    from alignlab.algorithms import grpo

    real, seen = grpo.grpo_loss, []

    def spy(*args, **kwargs):
        seen.append({**kwargs, "mask": args[3], "loss_type": args[8]})
        return real(*args, **kwargs)

    monkeypatch.setattr(grpo, "grpo_loss", spy)
    overrides = [
        "algorithm=grpo",
        "algorithm.importance_sampling_level=sequence",
        "algorithm.loss_type=cispo",
        "algorithm.epsilon_high=5.0",
        "algorithm.top_entropy_quantile=0.5",
        "algorithm.entropy_coef=0.01",
        "algorithm.num_generations=2",
        "algorithm.max_completion_length=4",
        "batch_size=4",
        "trainer.max_steps=2",
        "evaluation.at_start=false",
        *QUIET,
    ]
    result = train(compose(overrides, tmp_path))
    assert result["steps"] == 2 and len(seen) >= 2
    for call in seen:
        assert call["loss_type"] == "cispo" and call["importance_sampling_level"] == "sequence"
        assert call["entropy_coef"] == 0.01 and call["entropy"].requires_grad
        assert call["entropy_mask"] is not None and (call["entropy_mask"] <= call["mask"]).all()
    metrics = result["metrics"]
    assert "train/cispo_clip_ratio" in metrics and "train/entropy" in metrics and "train/loss" in metrics
    assert not [k for k in metrics if k.startswith("train/clip_ratio/")]
