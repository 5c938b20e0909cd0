"""DPO's loss-type mixes (MPO), reference options (ref_model, reference_free, TR-DPO) and KTO's and CPO's
loss types: wired to their pure functions, and refused with the key's name before any model loads."""

from __future__ import annotations

import copy

import pytest
import torch

from alignlab.errors import ConfigError
from alignlab.losses import dpo_loss, kto_loss
from alignlab.models.logprobs import answer_logprobs
from alignlab.models.reference import ReferenceModel
from tests.algorithms.test_algorithms import kto_batch, perturbed
from tests.conftest import CONF, QUIET, build_module, compose
from tests.models.test_model_math import pair_batch


@pytest.fixture(scope="module")
def other_tokenizer(tiny, tmp_path_factory):
    """A folder whose tokenizer has one token more than the tiny model's."""
    folder = tmp_path_factory.mktemp("other_tokenizer")
    tokenizer = copy.deepcopy(tiny[1])
    tokenizer.add_tokens(["<extra>"])
    tokenizer.save_pretrained(folder)
    return folder


BAD = [
    (["algorithm.loss_type=[sigmoid,nope]"], "algorithm.loss_type: unknown DPO loss type 'nope'"),
    (["algorithm.loss_type=sigmoid_nrom"], "unknown DPO loss type 'sigmoid_nrom' (did you mean sigmoid_norm?)"),
    (["algorithm.loss_type=[sigmoid,sigmoid]"], "algorithm.loss_type names a loss type twice"),
    (["algorithm.loss_type=[sigmoid,bco_pair]", "algorithm.loss_weights=[1.0]"], "a list of 2 numbers, one per"),
    (
        ["algorithm.loss_type=[sigmoid,bco_pair]", "algorithm.loss_weights=[1.0,-1]"],
        "loss_weights must be numbers >= 0",
    ),
    (["algorithm.loss_type=exo_pair"], "exo_pair needs algorithm.label_smoothing > 0"),
    (["algorithm.discopop_tau=0"], "algorithm.discopop_tau must be > 0"),
    (["algorithm.ld_alpha=1.5"], "algorithm.ld_alpha must be in [0.0, 1.0]"),
    (["algorithm.f_divergence_type=kl"], "algorithm.f_divergence_type: unknown f-divergence 'kl'"),
    (["algorithm.f_divergence_type=js_divergence", "algorithm.loss_type=bco_pair"], "not ['bco_pair']"),
    (["algorithm.f_alpha_divergence_coef=0"], "algorithm.f_alpha_divergence_coef must be > 0"),
    (["algorithm.use_weighting=true", "algorithm.loss_type=aot"], "algorithm.use_weighting=true (WPO)"),
    (["algorithm.ipo_normalize_length=1"], "algorithm.ipo_normalize_length must be true or false"),
    (["algorithm.reference_free=true", "algorithm.ref_model=/x"], "algorithm.reference_free=true uses no reference"),
    (["algorithm.sync_ref_model=true"], "set algorithm.precompute_ref_log_probs=false"),
    (["algorithm.ref_model_sync_steps=0"], "algorithm.ref_model_sync_steps must be a whole number >= 1"),
    (["algorithm.ref_model_mixup_alpha=2"], "algorithm.ref_model_mixup_alpha must be in [0.0, 1.0]"),
    (
        ["algorithm.sync_ref_model=true", "algorithm.precompute_ref_log_probs=false", "model.lora.enabled=true"],
        "algorithm.sync_ref_model=true with model.lora.enabled=true",
    ),
    (["algorithm.ref_model=/nowhere/model"], "algorithm.ref_model=/nowhere/model: no such folder"),
    (
        ["algorithm=kto", "algorithm.loss_type=apo_zero"],
        "algorithm.loss_type: unknown KTO loss type 'apo_zero' (did you mean apo_zero_unpaired?); one of ('kto', "
        "'apo_zero_unpaired')",
    ),
    (["algorithm=kto", "algorithm.ref_model=/nowhere/model"], "algorithm.ref_model=/nowhere/model: no such folder"),
    (["algorithm=cpo", "algorithm.loss_type=simpo"], "algorithm.loss_type: unknown CPO loss type 'simpo'"),
    (["algorithm=cpo", "algorithm.loss_type=alphapo"], "set algorithm.cpo_alpha=0"),
    (["algorithm=cpo", "algorithm.alpha=true"], "algorithm.alpha must be a number"),
]


@pytest.mark.parametrize(("overrides", "message"), BAD)
def test_bad_options_fail_before_any_model_loads(overrides, message, tmp_path, monkeypatch):
    import alignlab.train

    monkeypatch.setattr(alignlab.train, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    with pytest.raises(ConfigError) as err:
        alignlab.train.train(compose(overrides, tmp_path / "run"))
    assert message in str(err.value)


@pytest.mark.parametrize("algorithm", ["dpo", "kto", "ppo"])
def test_a_reference_with_another_tokenizer_is_refused_before_loading(
    algorithm, other_tokenizer, tmp_path, monkeypatch
):
    import alignlab.train

    monkeypatch.setattr(alignlab.train, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    differ = r"reference model's tokenizer differs from the policy's .*'<extra>': policy none, reference model \d+"
    with pytest.raises(ConfigError, match=differ):
        reward = ["algorithm.reward_funcs=[accuracy]"] if algorithm == "ppo" else []
        alignlab.train.train(
            compose([f"algorithm={algorithm}", f"algorithm.ref_model={other_tokenizer}", *reward], tmp_path)
        )


def test_mpo_adds_the_weighted_terms_and_logs_each(tiny):
    model, tokenizer = tiny
    batch = pair_batch(tokenizer)
    module = build_module(
        "dpo", perturbed(model), tokenizer, loss_type=["sigmoid", "bco_pair", "sft"], loss_weights=[0.8, 0.2, 1.0]
    )
    module.rpo_alpha = 0.5
    module.reference = ReferenceModel(module.model, copy.deepcopy(model))  # not the shared model: it would be frozen
    with torch.no_grad():
        loss, metrics = module.compute(batch)
        pol, ref = answer_logprobs(module.model, batch), answer_logprobs(model, batch)
    args = (pol.logps[:2], pol.logps[2:], ref.logps[:2], ref.logps[2:])
    sigmoid = dpo_loss(*args, beta=0.1).losses.mean()
    bco = dpo_loss(*args, beta=0.1, loss_type="bco_pair").losses.mean()
    nll = -pol.token_logps[:2].sum() / pol.mask[:2].sum()
    assert loss.item() == pytest.approx((0.8 * sigmoid + 0.2 * bco + 1.0 * nll + 0.5 * nll).item(), rel=1e-5)
    assert metrics["loss/sigmoid"].item() == pytest.approx(sigmoid.item(), rel=1e-5)
    assert metrics["loss/bco_pair"].item() == pytest.approx(bco.item(), rel=1e-5)
    assert metrics["loss/sft"].item() == pytest.approx(nll.item(), rel=1e-5)
    assert {"loss/sigmoid", "loss/bco_pair", "loss/sft"} <= set(module.step_sums)  # summed over micro-batches
    single, _ = build_module("dpo", perturbed(model), tokenizer).compute(batch)
    assert not any(
        k.startswith("loss/") for k in build_module("dpo", copy.deepcopy(model), tokenizer).compute(batch)[1]
    )
    assert torch.isfinite(single)


def test_reference_free_loads_no_reference_and_compares_with_zero(tiny):
    model, tokenizer = tiny
    batch = pair_batch(tokenizer)
    module = build_module("dpo", perturbed(model), tokenizer, reference_free=True, rpo_alpha=0.0)
    assert module.reference is None and module.configure_callbacks() == []
    with torch.no_grad():
        loss, metrics = module.compute(batch)
        pol = answer_logprobs(module.model, batch)
    zeros = torch.zeros(2)
    expected = dpo_loss(pol.logps[:2], pol.logps[2:], zeros, zeros, beta=0.1).losses.mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert metrics["rewards/chosen"].item() == pytest.approx(0.1 * pol.logps[:2].mean().item(), rel=1e-5)


def test_ref_model_is_loaded_from_its_folder(tiny, tiny_model_dir):
    model, tokenizer = tiny
    moved = perturbed(model)
    for name in ("dpo", "kto"):
        module = build_module(name, copy.deepcopy(moved), tokenizer, ref_model=str(tiny_model_dir))
        ref = module.reference.copy
        assert ref is not None and ref is not module.model
        assert all(torch.equal(p, q) for p, q in zip(ref.parameters(), model.parameters()))  # the folder's weights


def test_ld_alpha_scores_the_reference_alike(tiny):
    model, tokenizer = tiny
    batch = pair_batch(tokenizer)  # pair 2: rejected "34 and more" is longer than chosen "35"
    module = build_module("dpo", perturbed(model), tokenizer, ld_alpha=0.0, rpo_alpha=0.0)
    module.reference = ReferenceModel(module.model, copy.deepcopy(model))  # not the shared model: it would be frozen
    scored = module.score_reference(batch)
    ref = answer_logprobs(model, batch)
    chosen, rejected = ref.split_pairs(2)
    assert torch.allclose(scored["ref_chosen_logps"], chosen.logps)  # the shorter answers count whole
    assert scored["ref_rejected_logps"][1] > rejected.logps[1]  # the longer one's tail is left out (α = 0)


def test_dpo_syncs_its_reference_after_optimizer_steps(tiny):
    model, tokenizer = tiny
    module = build_module(
        "dpo", copy.deepcopy(model).double(), tokenizer, sync_ref_model=True, ref_model_sync_steps=1,
        ref_model_mixup_alpha=0.5, precompute_ref_log_probs=False,
    )  # fmt: skip
    before = {n: p.detach().clone() for n, p in module.reference.copy.named_parameters()}
    with torch.no_grad():
        for p in module.model.parameters():
            p.add_(1.0)
    optimizer = torch.optim.SGD(module.model.parameters(), lr=0.0)
    module.optimizer_step(0, 0, optimizer, lambda: None)  # Lightning's hook: the step, then the sync
    policy = dict(module.model.named_parameters())
    for name, p in module.reference.copy.named_parameters():
        torch.testing.assert_close(p, 0.5 * policy[name] + 0.5 * before[name], rtol=0, atol=1e-12)
    assert module.optimizer_steps == 1


def test_mpo_and_tr_dpo_train_two_steps(tmp_path):
    from alignlab.train import train

    result = train(
        compose(
            [
                "trainer.max_steps=2",
                "algorithm.loss_type=[sigmoid,bco_pair,sft]",
                "algorithm.loss_weights=[0.8,0.2,1.0]",
                "algorithm.sync_ref_model=true",
                "algorithm.ref_model_sync_steps=1",
                "algorithm.precompute_ref_log_probs=false",
                "evaluation.exact_match=false",
                *QUIET,
            ],
            tmp_path / "run",
        )
    )
    assert result["steps"] == 2
    assert {"train/loss/sigmoid", "train/loss/bco_pair", "train/loss/sft"} <= set(result["metrics"])


def test_kto_apo_zero_unpaired_matches_the_pure_function_without_a_reference_point(tiny):
    model, tokenizer = tiny
    _, batch = kto_batch(tokenizer)
    module = build_module("kto", perturbed(model, scale=0.05), tokenizer, loss_type="apo_zero_unpaired")
    module.reference = ReferenceModel(module.model, copy.deepcopy(model))  # not the shared model: it would be frozen
    module.reference_point = lambda b: pytest.fail("APO-zero has no reference point")
    with torch.no_grad():
        loss, metrics = module.compute(batch)
        pol, ref = answer_logprobs(module.model, batch), answer_logprobs(model, batch)
    expected = kto_loss(pol.logps[:3], ref.logps[:3], batch["label"], torch.tensor(5.0), 0.1)  # KTO, z₀ = 5
    expected_apo = kto_loss(
        pol.logps[:3], ref.logps[:3], batch["label"], torch.tensor(0.0), 0.1, loss_type="apo_zero_unpaired"
    )
    assert loss.item() == pytest.approx(expected_apo.losses.mean().item(), rel=1e-5)
    assert loss.item() != pytest.approx(expected.losses.mean().item(), rel=1e-3)
    assert metrics["kl"].item() == 0.0


def test_the_loss_type_sweep_runs_every_loss_type_but_exo_pair(tmp_path):
    """sweep=dpo_loss_types: its grid is every DPO loss type that needs no other setting, each passing the
    config checks."""
    from omegaconf import OmegaConf

    from alignlab.losses import DPO_LOSS_TYPES, DPO_LOSSES
    from alignlab.runner.config import check_config

    grid = OmegaConf.load(CONF / "sweep" / "dpo_loss_types.yaml").hydra.sweeper.params["algorithm.loss_type"]
    needs_epsilon = DPO_LOSSES.names(needs_label_smoothing=True)
    assert needs_epsilon == ("exo_pair",)  # the sweep's header says how to run it
    assert sorted(grid.split(",")) == sorted(set(DPO_LOSS_TYPES) - set(needs_epsilon))
    for loss_type in grid.split(","):
        check_config(compose([f"algorithm.loss_type={loss_type}"], tmp_path))


def test_the_reference_is_compared_with_the_tokenizer_the_policy_runs_with(tiny_model_dir, tmp_path):
    """An installed template's new markers are part of the policy's vocabulary: a reference saved with
    them (as an SFT run from that policy saves it) passes, the raw folder without them is refused."""
    from omegaconf import OmegaConf

    from alignlab.errors import ModelLoadError
    from alignlab.models.compatible import check_same_tokenizer
    from alignlab.models.loading import prepare_tokenizer

    template = "{% for m in messages %}<|turn|>{{ m['role'] }}\n{{ m['content'] }}<|end_turn|>{% endfor %}"
    model_cfg = OmegaConf.create(
        {"path": str(tiny_model_dir), "tiny": None, "trust_remote_code": False, "chat_template": template}
    )
    saved = tmp_path / "sft_model"
    prepare_tokenizer(str(tiny_model_dir), model_cfg, True)[0].save_pretrained(saved)
    check_same_tokenizer(model_cfg, str(saved), "algorithm.ref_model", require_chat_template=True)
    with pytest.raises(ConfigError, match=r"'<\|turn\|>': policy 259, reference model none"):
        check_same_tokenizer(model_cfg, str(tiny_model_dir), "algorithm.ref_model", require_chat_template=True)
    with pytest.raises(ModelLoadError):  # a Hub id: the offline hint, not "no such folder"
        check_same_tokenizer(model_cfg, "org/not-cached-here", "algorithm.ref_model", require_chat_template=True)


USER_LOSSES = """
import torch.nn.functional as F

from alignlab.losses.dpo import DPO_LOSSES


@DPO_LOSSES.register("user_scaled_sigmoid", f_divergence=True)
def scaled_sigmoid(p, scale=1.0):
    return -F.logsigmoid(scale * p.beta * p.h)


def plain_sigmoid(p):  # not registered: named by its dotted path
    return -F.logsigmoid(p.beta * p.h)
"""


@pytest.fixture
def user_losses(tmp_path, monkeypatch):
    """A user's module of DPO loss types on sys.path; the registry restored afterwards."""
    import sys

    from alignlab.losses import DPO_LOSSES

    (tmp_path / "user_dpo_losses.py").write_text(USER_LOSSES)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "user_dpo_losses", raising=False)
    monkeypatch.setattr(DPO_LOSSES, "_entries", dict(DPO_LOSSES._entries))


def test_a_users_own_loss_type_passes_the_checks_and_trains_by_dotted_path(user_losses, tiny, tmp_path):
    """algorithm.loss_type=<dotted path> (alone, in an MPO list, or as {_target_: ..., kwargs}) passes the
    preflight and the config check, and the module's loss is the user's function of the pair's quantities."""
    from alignlab.runner.config import check_config
    from alignlab.runner.preflight import preflight

    mix = ["algorithm.loss_type=[sigmoid,user_dpo_losses.plain_sigmoid]", "algorithm.loss_weights=[0.5,0.5]"]
    target = ["algorithm.loss_type={_target_:user_dpo_losses.scaled_sigmoid,scale:2.0}"]
    for overrides in (["algorithm.loss_type=user_dpo_losses.plain_sigmoid"], mix, target):
        preflight(overrides)
        check_config(compose(overrides, tmp_path))
    with pytest.raises(ConfigError, match="'user_dpo_losses' has no 'nothing'"):
        check_config(compose(["algorithm.loss_type=user_dpo_losses.nothing"], tmp_path))
    with pytest.raises(ConfigError, match=r"generalises only .* not \['user_dpo_losses.plain_sigmoid'\]"):
        divergence = ["algorithm.loss_type=user_dpo_losses.plain_sigmoid", "algorithm.f_divergence_type=js_divergence"]
        check_config(compose(divergence, tmp_path))  # not declared f_divergence=True: refused

    model, tokenizer = tiny
    batch = pair_batch(tokenizer)
    policy = perturbed(model)
    baseline = build_module("dpo", policy, tokenizer, rpo_alpha=0.0, beta=0.2)
    baseline.reference = ReferenceModel(baseline.model, copy.deepcopy(model))
    with torch.no_grad():
        expected, _ = baseline.compute(batch)  # −log σ(0.2·h)
        for loss_type, beta in (
            ("user_dpo_losses.plain_sigmoid", 0.2),
            ({"_target_": "user_dpo_losses.scaled_sigmoid", "scale": 2.0}, 0.1),  # scale 2 doubles β
        ):
            module = build_module("dpo", policy, tokenizer, rpo_alpha=0.0, beta=beta, loss_type=loss_type)
            module.reference = baseline.reference
            loss, _ = module.compute(batch)
            assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    mixed = build_module("dpo", policy, tokenizer, loss_type=["sigmoid", "user_dpo_losses.scaled_sigmoid"])
    assert mixed.term_metrics() == ("loss/sigmoid", "loss/user_scaled_sigmoid")  # registered under its own name
