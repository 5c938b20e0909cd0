"""Reference log-probs computed once (precompute_ref_log_probs): the ReferenceScoring callback asks the
DataModule for rows, the module scores them, and the values go back through the DataModule's documented
add_row_values; the module never reaches into the DataModule."""

from __future__ import annotations

import re
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch.utilities.exceptions import SIGTERMException

from alignlab.algorithms.kto import WeightAdvice
from alignlab.algorithms.reference_scoring import ReferenceScoring
from alignlab.data import LabelledDataModule, PairwiseDataModule
from alignlab.data.arith import ArithTask
from tests.algorithms.test_algorithms import perturbed
from tests.conftest import ROOT, build_module


def datamodule(tokenizer, cls=PairwiseDataModule, kind="pairwise", batch_size=4):
    rows = ArithTask(seed=0, n_train=10, n_eval=5).load(kind)
    dm = cls(SimpleNamespace(load=lambda *_, **__: rows), batch_size=batch_size, eval_batch_size=8, max_length=64)
    dm.set_tokenizer(tokenizer)
    dm.setup()
    return dm


def given_values(dm, monkeypatch) -> list:
    """The calls to dm.add_row_values, recorded as they pass through."""
    calls, add = [], dm.add_row_values

    def recorded(split, positions, values):
        calls.append((split, list(positions), {k: v.clone() for k, v in values.items()}))
        add(split, positions, values)

    monkeypatch.setattr(dm, "add_row_values", recorded)
    return calls


@pytest.mark.parametrize(
    ("name", "cls", "kind"), [("dpo", PairwiseDataModule, "pairwise"), ("kto", LabelledDataModule, "labelled")]
)
def test_the_callback_hands_the_references_values_to_the_datamodule_and_frees_the_copy(
    tiny, monkeypatch, name, cls, kind
):
    model, tokenizer = tiny
    dm = datamodule(tokenizer, cls, kind)
    module = build_module(name, perturbed(model), tokenizer, precompute_ref_log_probs=True)
    assert [type(c) for c in module.configure_callbacks() if isinstance(c, ReferenceScoring)] == [ReferenceScoring]
    batches = {split: dm.collate(rows, with_prompts=False) for split, rows in dm.splits.items()}
    with torch.no_grad():
        live = {split: module.compute(batch)[0] for split, batch in batches.items()}
        expected = {split: module.score_reference(batch) for split, batch in batches.items()}
    calls = given_values(dm, monkeypatch)

    ReferenceScoring().on_train_start(SimpleNamespace(datamodule=dm, received_sigterm=False), module)

    assert [(split, positions) for split, positions, _ in calls] == dm.scoring_batches()
    for split, positions, values in calls:  # every row of both splits once, the reference's own numbers
        assert set(values) == set(expected[split])
        for key, value in values.items():
            assert torch.allclose(value, expected[split][key][positions], atol=1e-5)
    assert module.reference is None and module.frozen == []  # the copy's memory goes back
    with torch.no_grad():  # batches now carry the values: the same loss without a reference
        for split, rows in dm.splits.items():
            batch = dm.collate(rows, with_prompts=False)
            assert set(expected[split]) <= set(batch)
            assert torch.allclose(module.compute(batch)[0], live[split], atol=1e-6)


def test_a_signal_stops_scoring_after_the_current_batch(tiny, monkeypatch):
    model, tokenizer = tiny
    dm = datamodule(tokenizer, batch_size=2)
    module = build_module("dpo", model, tokenizer)
    trainer = SimpleNamespace(datamodule=dm, received_sigterm=False)
    calls, score = given_values(dm, monkeypatch), module.score_reference

    def score_then_signal(batch):
        trainer.received_sigterm = True  # arrives while this batch is scored
        return score(batch)

    monkeypatch.setattr(module, "score_reference", score_then_signal)
    with pytest.raises(SIGTERMException):
        ReferenceScoring().on_train_start(trainer, module)
    assert len(calls) == 1 and module.reference is not None  # this batch's values kept, nothing freed


def test_only_precomputing_modules_bring_the_callback(tiny):
    model, tokenizer = tiny
    assert build_module("dpo", model, tokenizer, precompute_ref_log_probs=False).configure_callbacks() == []
    assert build_module("sft", model, tokenizer).configure_callbacks() == []
    kto = build_module("kto", model, tokenizer).configure_callbacks()
    assert [type(c) for c in kto] == [ReferenceScoring, WeightAdvice]


def test_modules_never_reach_into_the_trainers_datamodule():
    """Data flows one way: callbacks hand rows and values between a module and the DataModule."""
    found = [
        p.name
        for p in (ROOT / "alignlab" / "algorithms").glob("*.py")
        if re.search(r"self\.(_)?trainer\.datamodule", p.read_text())
    ]
    assert found == []
