"""Each algorithm's LightningModule wires its pure loss correctly, and loads only the models it needs."""

from __future__ import annotations

import copy
import gc

import pytest
import torch

from alignlab.data import LabelledDataModule
from alignlab.data.rows import mismatch_partners
from alignlab.losses import cpo_loss, kto_loss, orpo_loss, simpo_loss
from alignlab.models.logprobs import answer_logprobs
from tests.conftest import OPTIM, ListSource, build_module
from tests.models.test_model_math import pair_batch


def perturbed(model, seed=0, scale=0.02):
    """A copy of the model moved away from the starting point, so rewards are not all zero."""
    g = torch.Generator().manual_seed(seed)
    moved = copy.deepcopy(model)
    with torch.no_grad():
        for p in moved.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return moved


def nll(out, n):
    return -(out.token_logps[:n].sum() / out.mask[:n].sum())


@pytest.mark.parametrize(
    ("name", "hparams", "reference"),
    [
        ("cpo", {"beta": 0.1, "cpo_alpha": 1.0}, lambda c, r, h: cpo_loss(c.logps, r.logps, h["beta"]).losses.mean()),
        ("cpo", {"beta": 0.3, "cpo_alpha": 0.0}, lambda c, r, h: cpo_loss(c.logps, r.logps, h["beta"]).losses.mean()),
        (
            "simpo",
            {"beta": 2.0, "simpo_gamma": 1.0, "cpo_alpha": 1.0},
            lambda c, r, h: simpo_loss(c.avg_logps, r.avg_logps, h["beta"], h["simpo_gamma"]).losses.mean(),
        ),
        (
            "simpo",
            {"beta": 2.0, "simpo_gamma": 0.5, "cpo_alpha": 0.0},
            lambda c, r, h: simpo_loss(c.avg_logps, r.avg_logps, h["beta"], h["simpo_gamma"]).losses.mean(),
        ),
        ("orpo", {"beta": 0.1}, lambda c, r, h: orpo_loss(c.avg_logps, r.avg_logps, h["beta"]).losses.mean()),
    ],
)
def test_reference_free_modules_add_their_nll_term(tiny, name, hparams, reference):
    model, tokenizer = tiny
    batch = pair_batch(tokenizer)
    module = build_module(name, perturbed(model), tokenizer, **hparams)
    with torch.no_grad():
        loss, metrics = module.compute(batch)
        out = answer_logprobs(module.model, batch)
    chosen, rejected = out.split_pairs(2)
    alpha = hparams.get("cpo_alpha", 1.0)  # ORPO always adds the NLL with weight 1
    assert loss.item() == pytest.approx((reference(chosen, rejected, hparams) + alpha * nll(out, 2)).item(), rel=1e-5)
    assert metrics["nll_loss"].item() == pytest.approx(nll(out, 2).item(), rel=1e-5)
    assert module.reference is None


def resident_models(cls: type) -> int:
    """Live instances of the model class (a causal LM also holds its decoder, another PreTrainedModel)."""
    gc.collect()
    return sum(type(o) is cls for o in gc.get_objects())


@pytest.mark.parametrize(("name", "extra"), [("cpo", 0), ("orpo", 0), ("simpo", 0), ("sft", 0), ("dpo", 1), ("kto", 1)])
def test_only_reference_based_algorithms_hold_a_second_model(tiny, name, extra):
    model, tokenizer = tiny
    policy = copy.deepcopy(model)
    before = resident_models(type(model))
    module = build_module(name, policy, tokenizer)
    assert resident_models(type(model)) - before == extra
    del module


def kto_batch(tokenizer, answers=("7", "9", "35"), labels=(True, False, True)):
    prompts = [[{"role": "user", "content": q}] for q in ("3+4=", "4+4=", "10+25=")]
    rows = [{"prompt": p, "completion": a, "label": lab} for p, a, lab in zip(prompts, answers, labels)]
    dm = LabelledDataModule(ListSource({"labelled": rows}), batch_size=3, eval_batch_size=3, max_length=64)
    dm.set_tokenizer(tokenizer)
    dm.setup()
    return dm, dm.collate(dm.splits["train"], with_prompts=False)


def test_kto_batch_pairs_each_prompt_with_its_partners_answer(tiny):
    _, tokenizer = tiny
    dm, batch = kto_batch(tokenizer)
    assert batch["input_ids"].shape[0] == 6
    assert batch["label"].tolist() == [True, False, True]

    def decode(i):
        return tokenizer.decode(batch["input_ids"][i][batch["attention_mask"][i].bool()])

    answers = ["7", "9", "35"]
    partners = mismatch_partners(3, dm.seed)
    assert sorted(partners) == [0, 1, 2] and all(p != i for i, p in enumerate(partners))
    for i, question in enumerate(("3+4=", "4+4=", "10+25=")):
        assert decode(i).endswith(f"{question}<|im_end|>\n<|im_start|>assistant\n{answers[i]}<|im_end|>")
        mismatched = f"{question}<|im_end|>\n<|im_start|>assistant\n{answers[partners[i]]}<|im_end|>"
        assert decode(3 + i).endswith(mismatched)
    # The pairing belongs to the rows, not to the batch: a batch of rows 2 and 0 keeps it.
    again = dm.collate([dm.splits["train"][2], dm.splits["train"][0]], with_prompts=False)

    def tokens(b, i):
        return b["input_ids"][i][b["attention_mask"][i].bool()].tolist()

    assert tokens(again, 2) == tokens(batch, 5) and tokens(again, 3) == tokens(batch, 3)


@pytest.mark.parametrize("n", [1, 2, 3, 10, 101])
def test_mismatch_partners_form_one_cycle_through_every_row(n):
    partners = mismatch_partners(n, seed=7)
    assert sorted(partners) == list(range(n))  # every answer is used once
    row, seen = 0, set()
    while row not in seen:  # one cycle: following partners from row 0 visits every row
        seen.add(row)
        row = partners[row]
    assert len(seen) == n and (n == 1 or all(p != i for i, p in enumerate(partners)))
    assert mismatch_partners(n, seed=7) == partners
    if n > 3:
        assert mismatch_partners(n, seed=8) != partners


def test_kto_module_loss_matches_the_pure_function(tiny):
    model, tokenizer = tiny
    _, batch = kto_batch(tokenizer)
    module = build_module(
        "kto", copy.deepcopy(model), tokenizer, beta=0.1, desirable_weight=1.5, undesirable_weight=0.5
    )
    module.model.load_state_dict(perturbed(model, scale=0.05).state_dict())  # policy moves, reference stays
    with torch.no_grad():
        loss, metrics = module.compute(batch)
        pol, ref = answer_logprobs(module.model, batch), answer_logprobs(model, batch)
    kl = (pol.logps[3:] - ref.logps[3:]).mean()
    expected = kto_loss(pol.logps[:3], ref.logps[:3], batch["label"], kl, 0.1, 1.5, 0.5).losses.mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert metrics["kl"].item() == pytest.approx(max(kl.item(), 0.0), abs=1e-6)
    rewards = 0.1 * (pol.logps[:3] - ref.logps[:3])
    value, count = metrics["rewards/chosen"]
    assert count == 2 and value.item() == pytest.approx(rewards[[0, 2]].mean().item(), rel=1e-4)
    value, count = metrics["rewards/rejected"]
    assert count == 1 and value.item() == pytest.approx(rewards[1].item(), rel=1e-4)


def test_kto_gradient_equals_one_forward_over_both_halves(tiny):
    """The mismatched half is scored without gradients (z₀ is detached): the policy gradient is the
    paper's, taken through one forward over the whole batch."""
    model, tokenizer = tiny
    _, batch = kto_batch(tokenizer)
    module = build_module("kto", copy.deepcopy(model), tokenizer, beta=0.5)
    module.model.load_state_dict(perturbed(model, scale=0.05).state_dict())
    loss, _ = module.compute(batch)
    loss.backward()
    got = {name: p.grad.clone() for name, p in module.model.named_parameters()}
    module.model.zero_grad()
    pol = answer_logprobs(module.model, batch)
    with torch.no_grad():
        ref = answer_logprobs(model, batch)
    kl = (pol.logps[3:] - ref.logps[3:]).detach().mean()
    kto_loss(pol.logps[:3], ref.logps[:3], batch["label"], kl, 0.5, 1.0, 1.0).losses.mean().backward()
    assert any(g.abs().sum() > 0 for g in got.values())
    for name, p in module.model.named_parameters():
        torch.testing.assert_close(got[name], p.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_kto_all_desirable_batch_logs_no_rejected_side(tiny):
    model, tokenizer = tiny
    _, batch = kto_batch(tokenizer, labels=(True, True, True))
    module = build_module("kto", perturbed(model), tokenizer)
    with torch.no_grad():
        loss, metrics = module.compute(batch)
    assert torch.isfinite(loss)
    assert metrics["rewards/rejected"][1] == 0 and metrics["rewards/margins"][1] == 0


# DPO's keys other than those the test below leaves out or names, at their defaults
DPO_OTHER_KEYS = {
    "disable_dropout": True,
    "loss_weights": None,
    "discopop_tau": 0.05,
    "ipo_normalize_length": False,
    "ld_alpha": None,
    "reference_free": False,
    "use_weighting": False,
    "f_divergence_type": "reverse_kl",
    "f_alpha_divergence_coef": 0.5,
    "ref_model": None,
    "sync_ref_model": False,
    "ref_model_sync_steps": 512,
    "ref_model_mixup_alpha": 0.6,
}


def test_a_module_refuses_missing_or_unknown_hyper_parameters(tiny):
    from alignlab.algorithms.dpo import DPO

    model, tokenizer = tiny
    with pytest.raises(
        TypeError, match=r"missing \['label_smoothing', 'precompute_ref_log_probs'\], unknown \['gamma'\]"
    ):
        DPO(model, tokenizer, OPTIM, **DPO_OTHER_KEYS, beta=0.1, rpo_alpha=1.0, loss_type="sigmoid", gamma=1.0)


@pytest.mark.parametrize("name", ["sft", "dpo", "kto", "cpo", "orpo", "simpo", "rm", "ppo", "grpo", "gkd"])
def test_a_module_takes_exactly_the_keys_of_its_config_file(name):
    """conf/algorithm/<name>.yaml is the one place a hyper-parameter is written: the class it builds
    reads its names from there, and declares none of its own."""
    from hydra.utils import get_class

    from alignlab.runner.preflight import ALGORITHM_META_KEYS, load_option

    cfg = load_option("algorithm", name)  # the file with the partials it includes (conf/_partials/)
    keys = [k for k in cfg if k not in ("_target_", *ALGORITHM_META_KEYS)]
    cls = get_class(cfg._target_)
    assert cls.hparam_names() == tuple(keys)
    assert "hparam_names" not in vars(cls) and not set(keys) & set(vars(cls).get("__annotations__", {}))

    class Custom(cls):  # a subclass given as algorithm._target_ takes its parent's hyper-parameters
        pass

    assert Custom.hparam_names() == tuple(keys)


def test_a_class_no_config_file_builds_takes_no_hyper_parameters():
    from alignlab.algorithms.base import AlignmentModule
    from alignlab.algorithms.pairwise import PairwiseModule

    assert AlignmentModule.hparam_names() == PairwiseModule.hparam_names() == ()
