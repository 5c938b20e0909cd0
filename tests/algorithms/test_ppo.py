"""PPO: config checks, rollout layout, and gradient accumulation that equals one big batch."""

from __future__ import annotations

import copy

import pytest
import torch

from alignlab.errors import ConfigError
from alignlab.runner.config import check_config
from tests.conftest import build_module, compose


@pytest.fixture(scope="module")
def reward_folder(tiny, tmp_path_factory):
    """An (untrained) reward model folder made from the tiny model."""
    model, tokenizer = tiny
    run_dir = tmp_path_factory.mktemp("rm")
    return build_module("rm", copy.deepcopy(model), tokenizer).save_final(run_dir)


def prompt_batch(tokenizer, n=6):
    from alignlab.data.collate import collate_prompts
    from alignlab.data.tokenize import encode_prompts

    prompts = [[{"role": "user", "content": f"{i}+{i + 3}="}] for i in range(n)]
    return {**collate_prompts(encode_prompts(tokenizer, prompts), tokenizer.pad_token_id), "index": torch.arange(n)}


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ([], "required config value(s) not set: algorithm.reward_model"),
        (["algorithm.reward_model=/no/such/folder"], "algorithm.reward_model=/no/such/folder is not a reward-model"),
        (["algorithm.cliprange=0"], "algorithm.cliprange must be > 0"),
        (["algorithm.lam=1.5"], "algorithm.lam must be in [0, 1], got 1.5"),
        (["algorithm.gamma=-0.1"], "algorithm.gamma must be in [0, 1]"),
        (["algorithm.kl_coef=-1"], "algorithm.kl_coef must be >= 0"),
        (["algorithm.num_ppo_epochs=0"], "algorithm.num_ppo_epochs must be a whole number >= 1"),
        (["batch_size=10", "algorithm.num_mini_batches=3"], "batch_size (10 prompts per rollout) must be divisible"),
        (["batch_size=8", "algorithm.micro_batch_size=3"], "must be divisible by algorithm.micro_batch_size (3)"),
        (
            ["algorithm.max_tokens_per_micro_batch=-1"],
            "algorithm.max_tokens_per_micro_batch must be a whole number >= 1",
        ),
    ],
)
def test_ppo_config_errors_name_the_key(reward_folder, overrides, message, tmp_path):
    base = ["algorithm=ppo"] + ([f"algorithm.reward_model={reward_folder}"] if overrides else [])
    cfg = compose([*base, *overrides], tmp_path)
    with pytest.raises(ConfigError) as err:
        check_config(cfg)
    assert message in str(err.value)


def ppo_module(tiny, reward_folder, dtype: torch.dtype = torch.float32, **overrides):
    model, tokenizer = tiny
    return build_module(
        "ppo",
        copy.deepcopy(model).to(dtype),
        tokenizer,
        reward_model=str(reward_folder),
        response_length=6,
        temperature=1.0,
        **overrides,
    )


def test_rollout_layout_and_masks(tiny, reward_folder):
    _, tokenizer = tiny
    module = ppo_module(tiny, reward_folder, local_rollout_forward_batch_size=4)
    torch.manual_seed(0)
    ro = module.rollout(prompt_batch(tokenizer))
    n, length = ro["mask"].shape
    assert n == 6 and length <= 6
    for i in range(n):
        real = int(ro["mask"][i].sum())
        start = int(ro["starts"][i])
        response = ro["input_ids"][i, start : start + real].tolist()
        assert tokenizer.eos_token_id not in response[:-1]  # nothing after the first eos is kept
        assert ro["loss_mask"][i].sum() == real
        # padding past the response carries no advantage, return, value or log-prob
        for key in ("advantages", "returns", "values", "logprobs"):
            assert (ro[key][i, real:] == 0).all()
    assert set(ro["stats"]) == {
        "objective/kl",
        "objective/entropy",
        "objective/non_score_reward",
        "objective/rlhf_reward",
        "objective/scores",
        "val/num_eos_tokens",
    }
    assert ro["stats"]["objective/kl"].abs() < 1e-4  # policy == reference before any update


@pytest.mark.parametrize("micro", [1, 2, 3])
def test_gradient_accumulation_over_micro_batches_equals_one_big_batch(tiny, reward_folder, micro):
    _, tokenizer = tiny
    whole = ppo_module(tiny, reward_folder, num_ppo_epochs=1, num_mini_batches=1, micro_batch_size=None)
    torch.manual_seed(1)
    rollout = whole.rollout(prompt_batch(tokenizer))
    split = copy.deepcopy(whole)
    split.micro_batch_size = micro
    for module in (whole, split):
        optimizer = torch.optim.SGD([p for p in module.parameters() if p.requires_grad], lr=0.1)
        module.ppo_update(rollout, optimizer, generator=torch.Generator().manual_seed(0))
    for (name, a), b in zip(whole.named_parameters(), split.parameters()):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-5), name
    moved = [
        not torch.equal(a, b)
        for a, b in zip(whole.model.parameters(), ppo_module(tiny, reward_folder).model.parameters())
    ]
    assert any(moved)  # the update did change the policy


def test_a_token_budget_takes_the_steps_one_big_batch_takes(tiny, reward_folder):
    """algorithm.max_tokens_per_micro_batch: each mini-batch's rows sorted by length and cut by padded
    tokens, each forward cut to its own longest row, give the weights of the whole mini-batch at once
    (2 epochs × 2 mini-batches, in float64: the policy to 1e-10, the value model, whose loss is taken
    in float32, to 1e-6), and the same logged losses and token means."""
    _, tokenizer = tiny
    settings = {"num_ppo_epochs": 2, "num_mini_batches": 2, "max_tokens_per_micro_batch": None}
    whole = ppo_module(tiny, reward_folder, torch.float64, **settings)
    torch.manual_seed(1)
    rollout = whole.rollout(prompt_batch(tokenizer, n=8))
    lengths, width = rollout["attention_mask"].sum(1), rollout["attention_mask"].shape[1]
    split = copy.deepcopy(whole)
    split.max_tokens_per_micro_batch = 2 * int(lengths.max())
    widths = []  # what each policy forward of the update runs over
    split.model.get_decoder().register_forward_pre_hook(
        lambda m, args, kwargs: widths.append(kwargs["input_ids"].shape[1]), with_kwargs=True
    )
    logged = []
    for module in (whole, split):
        optimizer = torch.optim.SGD([p for p in module.parameters() if p.requires_grad], lr=0.1)
        logged.append(module.ppo_update(rollout, optimizer, generator=torch.Generator().manual_seed(0)))
    assert len(widths) >= 2 * 2 * 2 and min(widths) < width  # several micro-batches, some cut shorter
    # the value loss (its predictions are cast to float32) and the clip fractions are float32, the rest float64
    for key, value in logged[0].items():
        rel = 1e-6 if key in ("loss/value_avg", "val/clipfrac_avg", "policy/clipfrac_avg") else 1e-10
        assert logged[1][key].item() == pytest.approx(value.item(), rel=rel, abs=1e-12), key
    for (name, a), b in zip(whole.model.named_parameters(), split.model.parameters()):
        torch.testing.assert_close(b, a, atol=1e-12, rtol=1e-10, msg=name)
    for (name, a), b in zip(whole.value.named_parameters(), split.value.parameters()):
        torch.testing.assert_close(b, a, atol=1e-9, rtol=1e-6, msg=name)
    assert not torch.equal(whole.model.lm_head.weight, tiny[0].lm_head.weight.double())  # the steps moved it


def test_ppo_holds_four_models_with_lora_reference_as_disabled_adapter(tiny, reward_folder):
    from omegaconf import OmegaConf

    from alignlab.models.loading import apply_lora

    model, tokenizer = tiny
    lora = apply_lora(
        copy.deepcopy(model), OmegaConf.create({"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": "all-linear"})
    )
    module = build_module("ppo", lora, tokenizer, reward_model=str(reward_folder))
    assert module.reference.copy is None  # the disabled adapter, not a second policy
    assert module.value is not module.scorer.module
    trained = {id(p) for p in module.parameters() if p.requires_grad}
    assert all(id(p) in trained for p in module.value.parameters())
    assert not any(p.requires_grad for p in module.scorer.module.parameters())


def test_ppo_turns_dropout_off_in_the_policy_and_value_model_by_default(tiny, reward_folder):
    from omegaconf import OmegaConf

    from alignlab.models.loading import apply_lora

    model, tokenizer = tiny
    lora = apply_lora(
        copy.deepcopy(model), OmegaConf.create({"r": 4, "alpha": 8, "dropout": 0.1, "target_modules": "all-linear"})
    )
    assert any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in lora.modules())
    module = build_module("ppo", lora, tokenizer, reward_model=str(reward_folder))
    for part in (module.model, module.value):
        assert all(m.p == 0 for m in part.modules() if isinstance(m, torch.nn.Dropout))
