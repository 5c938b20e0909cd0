"""Speed settings change speed, not results: the same weights and metrics with and without each."""

from __future__ import annotations

import csv
from pathlib import Path

import lightning as L
import pytest
import torch

from alignlab.train import train
from tests.conftest import QUIET, compose

pytestmark = pytest.mark.slow

PADDING: dict[str, list[int]] = {}  # run name → [real tokens, padded tokens] of its training batches


class CountPadding(L.Callback):
    def __init__(self, name: str):
        self.name = name
        PADDING[name] = [0, 0]

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        PADDING[self.name][0] += int(batch["attention_mask"].sum())
        PADDING[self.name][1] += batch["attention_mask"].numel()


def run(tmp_path: Path, name: str, *overrides: str) -> dict:
    counting = [f"+callbacks.padding._target_={__name__}.CountPadding", f"+callbacks.padding.name={name}"]
    common = ["trainer.max_steps=8", "trainer.val_check_interval=4", "trainer.log_every_n_steps=1", *QUIET]
    return train(compose([*common, *counting, *overrides], tmp_path / name))


def weights(result: dict) -> dict[str, torch.Tensor]:
    path = Path(result["run_dir"]) / "checkpoints" / "last.ckpt"
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def history(result: dict, names: list[str]) -> dict[tuple[str, int], float]:
    with open(Path(result["run_dir"]) / "metrics.csv") as f:
        return {(n, int(r["step"])): float(r[n]) for r in csv.DictReader(f) for n in names if r.get(n)}


def assert_same(a: dict, b: dict, metrics: list[str]) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        torch.testing.assert_close(wb[key], wa[key], rtol=1e-4, atol=1e-5, msg=key)
    ha, hb = history(a, metrics), history(b, metrics)
    assert ha.keys() == hb.keys() and {n for n, _ in ha} == set(metrics)
    for key, value in ha.items():
        assert hb[key] == pytest.approx(value, rel=1e-4, abs=1e-5), key


REFERENCE_METRICS = {
    "dpo": ["train/loss", "train/rewards/margins", "eval/loss", "eval/rewards/chosen", "eval/rewards/accuracies"],
    "kto": ["train/loss", "train/kl", "eval/loss", "eval/kl", "eval/rewards/chosen", "eval/rewards/rejected"],
}


@pytest.mark.parametrize("algorithm", ["dpo", "kto"])
def test_precomputed_reference_log_probs_change_nothing_and_free_the_reference(tmp_path, monkeypatch, algorithm):
    from alignlab.algorithms.reference_scoring import ReferenceScoring

    name = f"algorithm={algorithm}"
    live = run(tmp_path, "live", name, "algorithm.precompute_ref_log_probs=false")
    calls = {"scored": 0, "in_training": 0}
    prescore = ReferenceScoring.on_train_start

    def counted(self, trainer, module):
        score = module.score_reference

        def counted_score(batch):
            calls["scored"] += 1
            calls["in_training"] += trainer.global_step > 0
            return score(batch)

        module.score_reference = counted_score
        prescore(self, trainer, module)
        del module.score_reference
        assert module.reference is None  # the copy is freed once every row carries its values

    monkeypatch.setattr(ReferenceScoring, "on_train_start", counted)
    cached = run(tmp_path, "cached", name, "algorithm.precompute_ref_log_probs=true")
    assert calls["scored"] > 0 and calls["in_training"] == 0  # scored once, before the first step
    assert_same(live, cached, REFERENCE_METRICS[algorithm])


def test_grouping_by_length_within_a_step_changes_nothing_but_padding(tmp_path):
    """Four micro-batches of 4 pairs per step, with and without sorting the step's 16 pairs by length,
    and the step cut by tokens (max_tokens_per_micro_batch=400: 4 or more micro-batches): the same
    weights and losses as one batch of 16, grouped with a third less padding than plain."""
    dpo = []  # rpo_alpha's NLL included: it divides by the step's chosen tokens
    rows = ["max_tokens_per_micro_batch=null"]
    whole = run(tmp_path, "whole", *dpo, *rows, "batch_size=16")
    micro = [*rows, "batch_size=4", "trainer.accumulate_grad_batches=4", "trainer.val_check_interval=16"]
    plain = run(tmp_path, "plain", *dpo, *micro)
    grouped = run(tmp_path, "grouped", *dpo, *micro, "data.group_by_length=true")
    tokens = run(tmp_path, "tokens", *dpo, "batch_size=16", "max_tokens_per_micro_batch=400")
    metrics = ["eval/loss", "eval/rewards/margins", "eval/rewards/accuracies"]
    assert_same(whole, grouped, metrics)
    assert_same(plain, grouped, metrics)
    assert_same(whole, tokens, metrics)
    assert PADDING["plain"][0] == PADDING["grouped"][0] == PADDING["whole"][0] == PADDING["tokens"][0]
    pad = {name: padded - real for name, (real, padded) in PADDING.items()}
    assert pad["grouped"] < 0.67 * pad["plain"], pad
    assert pad["tokens"] < 0.67 * pad["plain"], pad
