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
        ([], "set algorithm.reward_model (a reward-model folder, <rm run>/model) or algorithm.reward_funcs"),
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
        (["algorithm.kl_estimator=k4"], "algorithm.kl_estimator must be one of ('k1', 'k2', 'k3', "),
        (
            ["algorithm.use_bias_correction_kl=true"],
            "algorithm.use_bias_correction_kl=true weights the KL loss term, which needs use_kl_loss=true",
        ),
        (
            ["algorithm.use_kl_loss=true", "algorithm.kl_estimator=k2", "algorithm.use_bias_correction_kl=true"],
            "algorithm.use_bias_correction_kl weights the KL by ρ = π/π_old, whose gradient is ∇E_π[estimate]",
        ),
        (["algorithm.kl_target=0"], "algorithm.kl_target must be > 0, got 0"),
        (["algorithm.kl_horizon=0"], "algorithm.kl_horizon must be > 0, got 0"),
        (["algorithm.kl_target=6", "algorithm.kl_coef=0"], "algorithm.kl_coef must be > 0, got 0"),
        (["trainer.accumulate_grad_batches=3"], "trainer.accumulate_grad_batches=3 does not apply to algorithm=ppo"),
        (["algorithm.dual_clip=1"], "algorithm.dual_clip must be null or a number > 1 (Ye et al. use 3), got 1"),
        (["algorithm.dual_clip=0.5"], "algorithm.dual_clip must be null or a number > 1"),
        (["algorithm.entropy_coef=-0.01"], "algorithm.entropy_coef must be >= 0, got -0.01"),
        (["algorithm.reward_clip_range=0"], "algorithm.reward_clip_range must be null, a number r > 0"),
        (["algorithm.reward_clip_range=[1,-1]"], "[low, high] with low < high, got [1, -1]"),
        (["algorithm.reward_clip_range=[1,2,3]"], "algorithm.reward_clip_range must be null"),
        (["algorithm.reward_funcs=[nope]"], "unknown reward function 'nope'"),
        (
            ["algorithm.reward_funcs=[accuracy]", "algorithm.reward_weights=[1,2]"],
            "algorithm.reward_weights has 2 weights for 1 reward functions (algorithm.reward_funcs)",
        ),
        (
            ["algorithm.reward_model=null", "algorithm.reward_funcs=[]"],
            "algorithm=ppo needs a reward: set algorithm.reward_model",
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


def test_the_new_options_pass_the_checks_at_sensible_values(reward_folder, tmp_path):
    options = [
        "algorithm.kl_estimator=k3",
        "algorithm.use_kl_loss=true",
        "algorithm.kl_target=6",
        "algorithm.dual_clip=3",
        "algorithm.entropy_coef=0.01",
        "algorithm.reward_clip_range=[-2,5]",
    ]
    check_config(compose(["algorithm=ppo", f"algorithm.reward_model={reward_folder}", *options], tmp_path))
    rule_only = ["algorithm=ppo", "algorithm.reward_funcs=[accuracy]", "algorithm.reward_clip_range=5"]
    check_config(compose(rule_only, tmp_path))


def arith_batch(tokenizer, n=4):
    """A batch of the bundled arithmetic prompts as the datamodule gives it: ids, message lists and the
    `solution` column the reward functions read."""
    from alignlab.data import PromptDataModule
    from alignlab.data.arith import ArithTask

    dm = PromptDataModule(ArithTask(n_train=16, n_eval=4), batch_size=n)
    dm.set_tokenizer(tokenizer)
    dm.setup()
    return next(iter(dm.train_dataloader()))


def test_rule_rewards_only_a_value_model_from_the_policy_and_no_reward_model(tiny):
    """reward_model=null with reward_funcs: no reward model; the value model is a copy of the starting
    policy (same weights, its own tensors, trained) under a fresh value head; the score is the reward."""
    from alignlab.models.reward import RewardModel

    model, tokenizer = tiny
    module = build_module("ppo", copy.deepcopy(model), tokenizer, reward_funcs=["accuracy"], response_length=6)
    assert module.scorer is None and module.frozen == [module.reference]
    assert isinstance(module.value, RewardModel)
    policy = dict(module.model.named_parameters())
    for name, param in module.value.backbone.named_parameters():
        assert torch.equal(param, policy[name]) and param.data_ptr() != policy[name].data_ptr(), name
    trained = {id(p) for p in module.parameters() if p.requires_grad}
    assert all(id(p) in trained for p in module.value.parameters())
    seen = {}

    def spy(prompts, completions, solution, **columns):  # accuracy, recording what it was given
        seen.update(completions=completions, solution=solution)
        return [float(c.strip() == s) for c, s in zip(completions, solution)]

    module.rewards = [("spy", spy)]
    batch = arith_batch(tokenizer)
    rollout = module.rollout(batch)
    assert seen["solution"] == batch["columns"]["solution"] and len(seen["completions"]) == 4
    expected = torch.tensor([float(c.strip() == s) for c, s in zip(seen["completions"], seen["solution"])])
    assert torch.equal(rollout["scores"], expected)
    assert {"rewards/spy/mean", "rewards/spy/std"} <= set(rollout["stats"])
    assert module.eval_scores(batch, None, ["0", "1", "2", "3"]).shape == (4,)


def test_a_reward_model_and_rule_rewards_add_up_with_the_model_at_weight_one(tiny, reward_folder):
    """score = reward model + Σ w_i·f_i: the same answers (keyed sampling) scored by a reward model alone
    and by the reward model plus a rule reward of weight 2."""
    _, tokenizer = tiny
    batch = arith_batch(tokenizer)
    alone = ppo_module(tiny, reward_folder).rollout(batch)
    both = ppo_module(tiny, reward_folder, reward_funcs=["length"], reward_weights=[2.0])
    lengths = []

    def length(prompts, completions, **columns):
        lengths.extend(float(len(c)) for c in completions)
        return [float(len(c)) for c in completions]

    both.rewards = [("length", length)]
    combined = both.rollout(batch)
    assert torch.equal(combined["input_ids"], alone["input_ids"])
    torch.testing.assert_close(combined["scores"], alone["scores"] + 2 * torch.tensor(lengths), rtol=0, atol=1e-6)


def test_ppo_scores_as_grpo_does_with_completion_ids_and_async_functions_together(tiny):
    """PPO's rollout scores on the online path (OnlineModule.rewards_of): each answer's token ids reach a
    function that takes `completion_ids`, and async functions are in flight at once (a count of the
    calls running, which one-at-a-time calls would keep at 1)."""
    import asyncio

    model, tokenizer = tiny
    module = build_module("ppo", copy.deepcopy(model), tokenizer, reward_funcs=["length"], response_length=6)
    seen, running = {}, {"now": 0, "most": 0}

    def by_ids(prompts, completions, completion_ids, **columns):
        seen["ids"] = completion_ids
        return [float(len(ids)) for ids in completion_ids]

    async def judge(prompts, completions, **columns):
        running["now"] += 1
        running["most"] = max(running["most"], running["now"])
        for _ in range(3):
            await asyncio.sleep(0)  # hands the loop to the other judge, when it runs beside this one
        running["now"] -= 1
        return [0.0] * len(completions)

    module.use_reward_functions([("by_ids", by_ids), ("judge_a", judge), ("judge_b", judge)])
    rollout = module.rollout(arith_batch(tokenizer))
    spans = zip(rollout["input_ids"], rollout["starts"].tolist(), rollout["mask"].sum(1).int().tolist())
    answers = [row[start : start + n].tolist() for row, start, n in spans]
    assert seen["ids"] == answers
    assert torch.equal(rollout["scores"], torch.tensor([float(len(a)) for a in answers]))
    assert running["most"] == 2


def test_reward_clipping_bounds_the_score_before_the_kl_penalty(tiny):
    _, tokenizer = tiny
    module = build_module(
        "ppo", copy.deepcopy(tiny[0]), tokenizer, reward_funcs=["length"], response_length=6, reward_clip_range=0.25
    )
    module.rewards = [("length", lambda p, c, **kw: [10.0 * (i - 1.5) for i in range(len(c))])]  # −15, −5, 5, 15
    rollout = module.rollout(arith_batch(tokenizer))
    assert rollout["scores"].tolist() == [-0.25, -0.25, 0.25, 0.25]
    assert rollout["stats"]["objective/scores"].item() == 0.0


def test_kl_options_reach_the_rollout_and_the_update(tiny, reward_folder):
    """kl_estimator changes the logged KL to its estimate; use_kl_loss takes the KL out of the reward
    (non-score reward 0) and puts it in the update (loss/kl_avg); kl_target logs β and moves it after a
    rollout by Ziegler's rule; dual_clip logs its clip fraction."""
    from alignlab.losses.rlhf import adaptive_kl_coef, kl_estimate

    _, tokenizer = tiny
    base = ppo_module(tiny, reward_folder, num_ppo_epochs=1)
    torch.manual_seed(0)
    base_rollout = base.rollout(prompt_batch(tokenizer))
    optimizer = torch.optim.SGD([p for p in base.parameters() if p.requires_grad], lr=0.5)
    base.ppo_update(base_rollout, optimizer, generator=torch.Generator().manual_seed(0))  # off the reference
    options = {"kl_estimator": "k3", "use_kl_loss": True, "kl_target": 6.0, "kl_horizon": 10, "dual_clip": 3.0}
    module = copy.deepcopy(base)
    for key, value in options.items():
        setattr(module, key, value)
    rollout = module.rollout(prompt_batch(tokenizer))
    stats = rollout["stats"]
    k3 = kl_estimate(rollout["logprobs"], rollout["ref_logprobs"], "k3") * rollout["mask"]
    assert stats["objective/kl"].item() == pytest.approx(k3.sum(1).mean().item(), rel=1e-6)
    assert stats["objective/kl"].item() > 0  # the policy has moved
    assert stats["objective/non_score_reward"].item() == 0.0  # the KL is in the loss, not the reward
    assert stats["objective/kl_coef"].item() == pytest.approx(0.05)
    optimizer = torch.optim.SGD([p for p in module.parameters() if p.requires_grad], lr=0.1)
    logged = module.ppo_update(rollout, optimizer, generator=torch.Generator().manual_seed(0))
    assert logged["loss/kl_avg"].item() > 0 and "policy/dual_clipfrac_avg" in logged
    module.update_kl_coef(rollout)
    expected = adaptive_kl_coef(0.05, stats["objective/kl"].item(), 6.0, 10, 6)
    assert module.current_kl_coef == pytest.approx(expected, rel=1e-12) and module.current_kl_coef != 0.05
    assert "current_kl_coef" in module.counters  # saved in checkpoints: a resumed run continues the same β


def test_the_entropy_bonus_raises_the_policy_entropy(tiny, reward_folder):
    """With the advantages zeroed, the update's only policy gradient is the entropy bonus's: one step
    raises the policy's mean entropy on the rollout's tokens; without it the policy does not move."""
    from alignlab.online.rollout import token_logprobs

    _, tokenizer = tiny
    torch.manual_seed(0)
    module = ppo_module(tiny, reward_folder, torch.float64, num_ppo_epochs=1, entropy_coef=1.0, vf_coef=0.0)
    rollout = module.rollout(prompt_batch(tokenizer))
    rollout["advantages"] = torch.zeros_like(rollout["advantages"])

    def entropy(m):
        with torch.no_grad():
            _, ent = token_logprobs(m.model, rollout, rollout["starts"], rollout["mask"].shape[1], 1.0, entropy=True)
        return (ent * rollout["mask"]).sum() / rollout["mask"].sum()

    before = entropy(module)
    for coef, moves in ((0.0, False), (1.0, True)):
        trained = copy.deepcopy(module)
        trained.entropy_coef = coef
        optimizer = torch.optim.SGD([p for p in trained.model.parameters() if p.requires_grad], lr=0.5)
        trained.ppo_update(rollout, optimizer, generator=torch.Generator().manual_seed(0))
        if moves:
            assert entropy(trained) > before + 1e-6
        else:
            assert torch.equal(entropy(trained), before)


def test_ppo_with_a_rule_reward_and_no_reward_model_trains_through_train(tmp_path):
    """A smoke run (2 optimizer steps) of `algorithm=ppo algorithm.reward_funcs=[accuracy]` with every
    new option on: it trains and logs the rule reward, the adaptive β, the KL loss and the dual clip."""
    import csv

    from alignlab.train import train
    from tests.conftest import QUIET

    overrides = [
        "algorithm=ppo",
        "algorithm.reward_funcs=[accuracy]",
        "algorithm.kl_estimator=k3",
        "algorithm.use_kl_loss=true",
        "algorithm.kl_target=6",
        "algorithm.dual_clip=3",
        "algorithm.entropy_coef=0.01",
        "algorithm.reward_clip_range=5",
        "algorithm.response_length=4",
        "algorithm.num_ppo_epochs=1",
        "algorithm.num_sample_generations=0",
        "batch_size=8",
        "trainer.max_steps=2",
        "trainer.log_every_n_steps=1",
        "trainer.val_check_interval=2",
        *QUIET,
    ]
    result = train(compose(overrides, tmp_path))
    with open(tmp_path / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    logged = {k for row in rows for k, v in row.items() if v}
    logs = (
        "rewards/accuracy/mean",
        "timing/reward/accuracy",
        "objective/kl_coef",
        "loss/kl_avg",
        "policy/dual_clipfrac_avg",
    )
    for key in logs:
        assert f"train/{key}" in logged, key
    assert "eval/objective/scores" in logged
    assert result["metrics"]


def test_with_a_lora_policy_and_no_reward_model_the_value_model_trains_its_own_adapter_copy(tiny):
    from omegaconf import OmegaConf

    from alignlab.models.loading import apply_lora

    model, tokenizer = tiny
    lora = apply_lora(
        copy.deepcopy(model), OmegaConf.create({"r": 4, "alpha": 8, "dropout": 0.1, "target_modules": "all-linear"})
    )
    module = build_module("ppo", lora, tokenizer, reward_funcs=["accuracy"])
    trained = {name for name, p in module.value.named_parameters() if p.requires_grad}
    assert {"value_head.weight", "value_head.bias"} <= trained
    assert all("lora_" in name for name in trained - {"value_head.weight", "value_head.bias"}) and len(trained) > 2
    policy = {id(p) for p in module.model.parameters()}
    assert not any(id(p) in policy for p in module.value.parameters())  # a copy: the two adapters train apart
    assert all(m.p == 0 for m in module.value.modules() if isinstance(m, torch.nn.Dropout))


def test_the_kl_loss_options_reach_the_kl_term(tiny, reward_folder, monkeypatch):
    """With use_kl_loss, the update's KL term is kl_loss_term of the policy, the reference and the rollout's
    log-probs (π_old) with kl_estimator and use_bias_correction_kl (its gradients: tests/losses/test_kl_gradient.py)."""
    import alignlab.algorithms.ppo as ppo_algorithm

    _, tokenizer = tiny
    options = {"use_kl_loss": True, "kl_estimator": "k3", "use_bias_correction_kl": True}
    module = ppo_module(tiny, reward_folder, num_ppo_epochs=1, **options)
    torch.manual_seed(0)
    rollout = module.rollout(prompt_batch(tokenizer))
    seen, real = [], ppo_algorithm.kl_loss_term
    monkeypatch.setattr(ppo_algorithm, "kl_loss_term", lambda *a: seen.append(a) or real(*a))
    optimizer = torch.optim.SGD([p for p in module.parameters() if p.requires_grad], lr=0.1)
    module.ppo_update(rollout, optimizer, generator=torch.Generator().manual_seed(0))
    assert seen and all(args[3:] == ("k3", True) for args in seen)
    old = torch.cat([args[2] for args in seen]).flatten().tolist()
    assert sorted(old) == sorted((rollout["logprobs"] * rollout["mask"]).flatten().tolist())  # each row, as π_old
