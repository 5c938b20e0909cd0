"""One optimizer step is the same step however it is cut, under every loss option of the offline
preference algorithms: DPO's loss types mixed with weights (MPO) including the token-level `sft` term and
rpo_alpha, `sigmoid_norm`, LD-DPO (ld_alpha), WPO (use_weighting), f-divergences and length-normalised IPO;
KTO's `apo_zero_unpaired`; CPO's `alphapo`, `ipo` and AlphaPO's reward shape with its NLL term.

Float64, rows whose answers alternate between 1 and ~60 tokens, reference log-probs moved away from the
policy's (so every log-ratio, WPO weight and f-divergence score is away from its value at 0): the
gradient of one batch of 8 equals that of accumulated, length-grouped, token-budget and 2-process
micro-batches (emulated as Lightning and DDP act on gradients, tests/algorithms/test_accumulation.py).
"""

from __future__ import annotations

import copy

import pytest
import torch

from tests.algorithms.test_accumulation import DATA, rows_of, step_gradient
from tests.conftest import ListSource, build_module

CUTS = {
    "4 micro-batches": dict(batch_size=2, accumulate=4),
    "2 grouped by length": dict(batch_size=4, accumulate=2, group=True),
    "2 processes × 2 grouped": dict(batch_size=2, accumulate=2, world=2, group=True),
    "by tokens, 150 a micro-batch": dict(batch_size=8, budget=150),
}

OPTIONS = {
    "dpo": [
        {"loss_type": ["sigmoid", "sft", "sigmoid_norm"], "loss_weights": [1.0, 0.5, 2.0], "rpo_alpha": 0.3},
        {"loss_type": "sft", "rpo_alpha": 0.0},
        {"loss_type": ["bco_pair", "apo_zero", "discopop", "nca_pair"], "rpo_alpha": 0.0},
        {"ld_alpha": 0.5},
        {"use_weighting": True, "loss_type": ["sigmoid", "sft"]},
        {"f_divergence_type": "js_divergence", "loss_type": ["sigmoid", "sigmoid_norm"]},
        {"loss_type": "ipo", "ipo_normalize_length": True},
    ],
    "kto": [{"loss_type": "apo_zero_unpaired", "desirable_weight": 1.5}],
    "cpo": [
        {"loss_type": "alphapo", "cpo_alpha": 0.0, "alpha": 0.5},
        {"loss_type": "ipo"},
        {"loss_type": "sigmoid", "alpha": 0.01, "cpo_alpha": 0.7},  # α on summed log-probs: small
        {"loss_type": "hinge"},
    ],
}
KIND = {"dpo": "pairwise", "cpo": "pairwise", "kto": "labelled"}
CASES = [(name, options) for name, variants in OPTIONS.items() for options in variants]


def moved_reference(module, tokenizer, name: str) -> dict | None:
    """Per-row reference values the datamodule hands every batch: the module's own reference scores of the
    8 rows (LD-DPO's weighted sums with ld_alpha), each moved by N(0, 0.5²) nats, so the policy's log-ratios
    are not all 0 at the first step. None for CPO (no reference)."""
    if name == "cpo":
        return None
    dm = DATA[KIND[name]](ListSource({KIND[name]: rows_of(KIND[name])}), batch_size=8, shuffle=False)
    dm.set_tokenizer(tokenizer)
    dm.setup()
    with torch.no_grad():
        scores = module.score_reference(dm.collate_rows("train", list(range(8))))
    g = torch.Generator().manual_seed(0)
    return {k: v.double() - 0.5 * torch.randn(8, generator=g, dtype=torch.float64) for k, v in scores.items()}


@pytest.mark.parametrize(("name", "options"), CASES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(CASES)])
def test_every_loss_option_takes_the_whole_batch_step_however_cut(tiny, monkeypatch, name, options):
    model, tokenizer = tiny
    module = build_module(name, copy.deepcopy(model).double(), tokenizer, **options).double()
    ref = moved_reference(module, tokenizer, name)
    kind = KIND[name]
    whole = step_gradient(module, tokenizer, kind, 8, ref=ref, monkeypatch=monkeypatch)
    assert whole.norm() > 1e-3
    for cut, kwargs in CUTS.items():
        got = step_gradient(module, tokenizer, kind, ref=ref, monkeypatch=monkeypatch, **kwargs)
        assert ((got - whole).norm() / whole.norm()).item() < 1e-6, cut


@pytest.mark.xfail(
    strict=True,
    reason="AOT sorts the pairs of each micro-batch (as TRL does, and as docs/algorithms.md says): a cut step "
    "sorts other sets of pairs. Sorting over the step needs every pair of the step in its first micro-batch "
    "(PairwiseDataModule.add_step_batches, as KTO's z₀ has), not yet there",
)
def test_aot_unpaired_sorts_over_the_whole_step_however_cut(tiny, monkeypatch):
    """Measured: the cut steps' gradients are 2%–20% (relative) off the whole batch's."""
    model, tokenizer = tiny
    module = build_module("dpo", copy.deepcopy(model).double(), tokenizer, loss_type="aot_unpaired", rpo_alpha=0.0)
    module = module.double()
    ref = moved_reference(module, tokenizer, "dpo")
    whole = step_gradient(module, tokenizer, "pairwise", 8, ref=ref, monkeypatch=monkeypatch)
    got = step_gradient(module, tokenizer, "pairwise", ref=ref, monkeypatch=monkeypatch, **CUTS["4 micro-batches"])
    assert ((got - whole).norm() / whole.norm()).item() < 1e-6
