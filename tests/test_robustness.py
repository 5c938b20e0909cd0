"""Runs that go wrong stop cleanly: a non-finite loss stops training before it reaches the weights,
with a message naming the step and the metric, and the checkpoints already written stay good."""

from __future__ import annotations

import pytest
import torch

from alignlab.errors import NonFiniteLossError
from alignlab.train import train
from tests.conftest import QUIET, compose


def test_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    from alignlab.algorithms import dpo

    real, calls = dpo.dpo_loss, {"train": 0}

    def poisoned(*args, **kwargs):  # the loss turns NaN at the fifth training step (global step 4)
        out = real(*args, **kwargs)
        if torch.is_grad_enabled():
            calls["train"] += 1
            if calls["train"] == 5:
                return out._replace(losses=out.losses * float("nan"))
        return out

    monkeypatch.setattr(dpo, "dpo_loss", poisoned)
    cfg = compose(
        [
            "trainer.max_steps=10",
            "callbacks.checkpoint.every_n_train_steps=2",
            "evaluation.at_start=false",
            "trainer.val_check_interval=10",
            *QUIET,
        ],
        tmp_path,
    )
    expected = r"train/loss is nan at step 4: .*last good checkpoint is .*last\.ckpt"
    with pytest.raises(NonFiniteLossError, match=expected):
        train(cfg)
    checkpoint = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert checkpoint["global_step"] == 4  # written after step 4, not overwritten by the failed step
    assert all(torch.isfinite(v).all() for v in checkpoint["state_dict"].values())
    assert (tmp_path / "config.yaml").exists() and not (tmp_path / "model").exists()


def test_non_finite_loss_is_caught_under_manual_optimisation_too(tiny):
    """PPO and GRPO step their optimizer themselves: the check sits before their backward as well."""
    from tests.conftest import build_module

    model, tokenizer = tiny
    module = build_module("grpo", model, tokenizer)
    with pytest.raises(NonFiniteLossError, match=r"train/loss is inf at step 0"):
        module.backpropagate(torch.tensor(float("inf"), requires_grad=True))
