"""Each DPO loss type's first-step loss equals TRL 1.16's DPOTrainer on the same model, reference and batch
(and CPO's loss types TRL's CPOTrainer.cpo_loss on the same log-probs). Skipped when TRL is absent."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch

from alignlab.models.reference import ReferenceModel
from tests.algorithms.test_algorithms import perturbed
from tests.conftest import build_module
from tests.models.test_model_math import pair_batch

trl = pytest.importorskip("trl")


@pytest.fixture(scope="module")
def trl_dpo(tiny, tmp_path_factory):
    """(TRL's DPOTrainer on a moved copy of the tiny model with the tiny model as reference, alignlab's
    (policy, reference, tokenizer)); TRL gets its own copies, since it patches its models' forward."""
    from datasets import Dataset

    model, tokenizer = tiny
    policy, reference = perturbed(model, seed=3, scale=0.05), copy.deepcopy(model)
    args = trl.DPOConfig(
        output_dir=str(tmp_path_factory.mktemp("trl_dpo")),
        report_to=[],
        use_cpu=True,
        bf16=False,
        precompute_ref_log_probs=False,
        use_weighting=True,  # its LM head then also returns log Σ p²; switched per case below
        disable_dropout=True,
    )
    rows = Dataset.from_list([{"prompt": "1+1=", "chosen": "2", "rejected": "3"}])
    trainer = trl.DPOTrainer(
        model=copy.deepcopy(policy),
        ref_model=copy.deepcopy(reference),
        args=args,
        train_dataset=rows,
        processing_class=tokenizer,
    )
    return trainer, (policy, reference, tokenizer)


# (alignlab's DPO overrides, TRL's attributes): rpo_alpha=0 throughout (TRL has no RPO term; its `sft` is it)
CASES = [
    *[({"loss_type": lt}, {"loss_types": [lt]}) for lt in ("sigmoid", "hinge", "nca_pair", "bco_pair", "sppo_hard")],
    *[({"loss_type": lt}, {"loss_types": [lt]}) for lt in ("apo_zero", "apo_down", "discopop", "sigmoid_norm", "sft")],
    ({"loss_type": "ipo", "ipo_normalize_length": True}, {"loss_types": ["ipo"]}),  # TRL ships IPO normalised
    *[
        ({"loss_type": lt, "label_smoothing": 0.1}, {"loss_types": [lt], "label_smoothing": 0.1})
        for lt in ("robust", "exo_pair", "aot", "aot_unpaired")
    ],
    ({"loss_type": "discopop", "discopop_tau": 0.5}, {"loss_types": ["discopop"], "discopop_tau": 0.5}),
    (
        {"loss_type": ["sigmoid", "bco_pair", "sft"], "loss_weights": [0.8, 0.2, 1.0]},
        {"loss_types": ["sigmoid", "bco_pair", "sft"], "loss_weights": [0.8, 0.2, 1.0]},
    ),
    *[
        ({"loss_type": lt, "f_divergence_type": f, "ipo_normalize_length": True}, {"loss_types": [lt], "f": f})
        for lt in ("sigmoid", "ipo", "sigmoid_norm")
        for f in ("forward_kl", "js_divergence", "alpha_divergence")
    ],
    (
        {"loss_type": "sigmoid", "f_divergence_type": "alpha_divergence", "f_alpha_divergence_coef": 0.3},
        {"loss_types": ["sigmoid"], "f": "alpha_divergence", "f_alpha_divergence_coef": 0.3},
    ),
    ({"loss_type": "sigmoid", "ld_alpha": 0.5}, {"loss_types": ["sigmoid"], "ld_alpha": 0.5}),
    ({"loss_type": "apo_zero", "ld_alpha": 0.0}, {"loss_types": ["apo_zero"], "ld_alpha": 0.0}),
    ({"loss_type": "sigmoid", "use_weighting": True}, {"loss_types": ["sigmoid"], "use_weighting": True}),
    (
        {"loss_type": "ipo", "ipo_normalize_length": True, "use_weighting": True},
        {"loss_types": ["ipo"], "use_weighting": True},
    ),
]


def trl_loss(trainer, batch: dict, beta: float, setting: dict) -> float:
    trainer.beta = beta
    trainer.loss_types = setting["loss_types"]
    trainer.loss_weights = setting.get("loss_weights", [1.0] * len(setting["loss_types"]))
    trainer.label_smoothing = setting.get("label_smoothing", 0.0)
    trainer.ld_alpha = setting.get("ld_alpha")
    trainer.f_divergence_type = setting.get("f", "reverse_kl")
    trainer.f_alpha_divergence_coef = setting.get("f_alpha_divergence_coef", 0.5)
    trainer.use_weighting = setting.get("use_weighting", False)
    trainer.args.discopop_tau = setting.get("discopop_tau", 0.05)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    inputs["completion_mask"] = batch["loss_mask"]  # 1 at answer tokens, chosen rows then rejected rows
    with torch.no_grad():
        return trainer._compute_loss(trainer.model, inputs, False).item()


@pytest.mark.parametrize(("ours", "theirs"), CASES, ids=lambda c: str(sorted(c.items())) if isinstance(c, dict) else c)
def test_first_step_loss_equals_trl(trl_dpo, ours, theirs):
    trainer, (policy, reference, tokenizer) = trl_dpo
    batch = pair_batch(tokenizer)
    module = build_module("dpo", policy, tokenizer, beta=0.3, rpo_alpha=0.0, **ours)
    module.reference = ReferenceModel(policy, reference)
    with torch.no_grad():
        loss, _ = module.compute(batch)
    expected = trl_loss(trainer, batch, 0.3, theirs)
    assert loss.item() == pytest.approx(expected, rel=1e-5, abs=1e-6)
    assert abs(expected) > 1e-4 or theirs["loss_types"] == ["sppo_hard"]  # a loss that says something


@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "ipo", "alphapo"])
@pytest.mark.parametrize("alpha", [0.0, 0.25])
def test_cpo_loss_types_equal_trl(tiny, loss_type, alpha):
    """CPO's preference term on one model's log-probs, against TRL's CPOTrainer.cpo_loss (alphapo is TRL's
    simpo loss type with alpha, its cpo_alpha set to 0; ipo and alphapo read length-normalised log-probs)."""
    from trl.experimental.cpo import CPOTrainer

    model, tokenizer = tiny
    batch = pair_batch(tokenizer)
    module = build_module("cpo", perturbed(model, seed=4, scale=0.05), tokenizer, loss_type=loss_type, alpha=alpha)
    module.cpo_alpha = 0.0
    with torch.no_grad():
        loss, _ = module.compute(batch)
        chosen, rejected = module.policy_pairs(batch)
    normalised = loss_type in ("ipo", "alphapo")
    w, r = (chosen.avg_logps, rejected.avg_logps) if normalised else (chosen.logps, rejected.logps)
    stub = SimpleNamespace(
        beta=module.beta,
        alpha=alpha,
        label_smoothing=0.0,
        loss_type="simpo" if loss_type == "alphapo" else loss_type,
        simpo_gamma=module.simpo_gamma,
        accelerator=SimpleNamespace(device=w.device),
    )
    losses, _, _ = CPOTrainer.cpo_loss(stub, w, r)
    assert loss.item() == pytest.approx(losses.mean().item(), rel=1e-6)


def test_kto_apo_zero_unpaired_equals_trl(tiny, tmp_path):
    """KTO's loss_type=apo_zero_unpaired against TRL's KTOTrainer on the same model, reference and rows."""
    from datasets import Dataset

    from tests.algorithms.test_algorithms import kto_batch

    model, tokenizer = tiny
    policy, reference = perturbed(model, seed=5, scale=0.05), copy.deepcopy(model)
    args = trl.KTOConfig(
        output_dir=str(tmp_path),
        report_to=[],
        use_cpu=True,
        bf16=False,
        loss_type="apo_zero_unpaired",
        beta=0.3,
        desirable_weight=1.5,
        undesirable_weight=0.5,
        disable_dropout=True,
    )
    rows = Dataset.from_list([{"prompt": "1+1=", "completion": "2", "label": True}])
    trainer = trl.KTOTrainer(
        model=copy.deepcopy(policy),
        ref_model=copy.deepcopy(reference),
        args=args,
        train_dataset=rows,
        processing_class=tokenizer,
    )
    _, batch = kto_batch(tokenizer)
    module = build_module(
        "kto", policy, tokenizer, loss_type="apo_zero_unpaired", beta=0.3, desirable_weight=1.5, undesirable_weight=0.5
    )
    module.reference = ReferenceModel(policy, reference)
    n = module.rows_in(batch)
    inputs = {k: batch[k][:n] for k in ("input_ids", "attention_mask")}
    inputs |= {"completion_mask": batch["loss_mask"][:n], "label": batch["label"]}
    with torch.no_grad():
        loss, _ = module.compute(batch)
        expected = trainer._compute_loss(trainer.model, inputs, False).item()
    assert loss.item() == pytest.approx(expected, rel=1e-5, abs=1e-7)
