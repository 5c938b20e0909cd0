"""GRPO's advantage estimators, KL in the reward, DAPO dynamic sampling, the soft overlong reward and
reference syncs, wired into the module."""

from __future__ import annotations

import copy
import sys

import pytest
import torch

from alignlab.errors import ConfigError
from alignlab.losses.grpo import estimate_advantages, kl_reward_penalty
from alignlab.models.reference import ReferenceModel
from alignlab.online.rewards import build_reward_function, call_reward_function
from alignlab.online.rollout import pack, token_logprobs
from alignlab.runner.config import check_config
from tests.conftest import QUIET, build_module, compose


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["algorithm.advantage_estimator=ppo"], "algorithm.advantage_estimator must be one of"),
        (["algorithm.scale_rewards=median"], "algorithm.scale_rewards must be one of"),
        (["algorithm.kl_in_reward=true"], "algorithm.kl_in_reward=true needs a reference model, and algorithm.beta=0"),
        (["algorithm.kl_estimator=k5"], "algorithm.kl_estimator must be one of ('k1', 'k2', 'k3', "),
        (["algorithm.use_bias_correction_kl=true"], "the KL loss term, which needs beta > 0, kl_in_reward=false"),
        (
            ["algorithm.beta=0.04", "algorithm.kl_estimator=k3+", "algorithm.use_bias_correction_kl=true"],
            "the reverse KL's for ('k1', 'k3') only, not kl_estimator=k3+",
        ),
        (
            ["algorithm.sync_ref_model=true"],
            "algorithm.sync_ref_model=true needs a reference model, and algorithm.beta",
        ),
        (["algorithm.max_resample_times=-1"], "algorithm.max_resample_times must be a whole number >= 0"),
        (["algorithm.ref_model_sync_steps=0"], "algorithm.ref_model_sync_steps must be a whole number >= 1"),
        (["algorithm.ref_model_mixup_alpha=1.5"], "algorithm.ref_model_mixup_alpha must be in [0.0, 1.0]"),
        (["algorithm.reward_funcs=[soft_overlong]"], "soft_overlong reward needs algorithm.soft_cache_length"),
        (
            ["algorithm.reward_funcs=[soft_overlong]", "algorithm.soft_cache_length=17"],
            "algorithm.soft_cache_length must be in [1, 16]",
        ),
        (
            ["algorithm.beta=0.04", "algorithm.sync_ref_model=true", "model.lora.enabled=true"],
            "algorithm.sync_ref_model=true with model.lora.enabled=true",
        ),
    ],
)
def test_advantage_and_sampling_config_errors_name_the_key(overrides, message, tmp_path):
    with pytest.raises(ConfigError) as err:
        check_config(compose(["algorithm=grpo", *overrides], tmp_path))
    assert message in str(err.value)


def test_the_defaults_pass_and_each_option_is_accepted(tmp_path):
    check_config(compose(["algorithm=grpo"], tmp_path))
    check_config(
        compose(
            [
                "algorithm=grpo",
                "algorithm.beta=0.04",
                "algorithm.advantage_estimator=rloo",
                "algorithm.kl_in_reward=true",
                "algorithm.dynamic_sample=true",
                "algorithm.sync_ref_model=true",
                "algorithm.reward_funcs=[accuracy,soft_overlong]",
                "algorithm.soft_cache_length=4",
            ],
            tmp_path,
        )
    )
    for estimator in ("k3", "k1"):  # TRL's use_bias_correction_kl: the ratio-weighted k3 (or k1)
        corrected = [f"algorithm.kl_estimator={estimator}", "algorithm.use_bias_correction_kl=true"]
        check_config(compose(["algorithm=grpo", "algorithm.beta=0.04", *corrected], tmp_path))
    check_config(compose(["algorithm=grpo", "algorithm.beta=0.04", "algorithm.kl_estimator=k3+"], tmp_path))


# -- soft_overlong: completion ids reach the reward functions that take them -----------------------
def test_soft_overlong_counts_completion_tokens_and_older_functions_still_work(tiny):
    module = build_module(
        "grpo", copy.deepcopy(tiny[0]), tiny[1], reward_funcs=["soft_overlong"], soft_cache_length=4
    )  # soft_max_length null: max_completion_length (16)
    name, fn = module.rewards[0]
    ids = [[1] * 12, [1] * 13, [1] * 16, [1] * 3]
    assert call_reward_function(name, fn, [[]] * 4, ["a"] * 4, {"completion_ids": ids}) == [0.0, -0.25, -1.0, 0.0]

    def no_kwargs(prompts, completions, solution):  # written before completion_ids existed
        return [float(c == s) for c, s in zip(completions, solution)]

    columns = {"solution": ["1", "2"], "completion_ids": [[5], [6]]}
    assert call_reward_function("old", no_kwargs, [[]] * 2, ["1", "3"], columns) == [1.0, 0.0]
    _, accuracy = build_reward_function("accuracy")  # registry functions take **columns: they ignore it
    assert call_reward_function("accuracy", accuracy, [[]] * 2, ["1", "3"], columns) == [1.0, 0.0]


def prompt_batch(tiny, batch_size=3, n_train=8):
    from alignlab.data import PromptDataModule
    from alignlab.data.arith import ArithTask

    dm = PromptDataModule(ArithTask(n_train=n_train, n_eval=4), batch_size=batch_size)
    dm.set_tokenizer(tiny[1])
    dm.setup()
    return dm, next(iter(dm.train_dataloader()))


def test_generation_passes_each_completions_token_ids_to_the_rewards(tiny):
    _, batch = prompt_batch(tiny)
    module = build_module("grpo", copy.deepcopy(tiny[0]), tiny[1], num_generations=2, max_completion_length=6)
    seen = {}

    def spy(prompts, completions, completion_ids, **columns):
        seen["ids"] = completion_ids
        return [float(len(ids)) for ids in completion_ids]

    module.rewards = [("spy", spy)]
    samples, texts, rewards, _ = module.sample_and_score(batch)
    assert seen["ids"] == samples.responses and rewards.tolist() == [float(len(r)) for r in samples.responses]


def test_a_users_own_advantage_estimator_passes_the_checks_and_sees_the_rollouts_lengths(tiny, tmp_path, monkeypatch):
    """algorithm.advantage_estimator={_target_: dotted.path, ...} or a dotted path: the user's function of
    AdvantageInputs (alignlab.losses.grpo), imported by the config check; the rollout hands it the lengths."""
    from alignlab.losses.grpo import ADVANTAGES
    from alignlab.online.rewards import length_reward

    (tmp_path / "my_adv.py").write_text(
        "def longer_first(x, weight=1.0):\n"
        "    return weight * (x.lengths.to(x.rewards.dtype) - x.lengths.to(x.rewards.dtype).mean()) + x.rewards\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "my_adv", raising=False)
    monkeypatch.setattr(ADVANTAGES, "_entries", dict(ADVANTAGES._entries))  # restored after the test
    for spelling in ("my_adv.longer_first", "{_target_: my_adv.longer_first, weight: 0.5}"):
        check_config(compose(["algorithm=grpo", f"algorithm.advantage_estimator={spelling}"], tmp_path))
    with pytest.raises(ConfigError, match="algorithm.advantage_estimator 'my_adv.nothing' could not be imported"):
        check_config(compose(["algorithm=grpo", "algorithm.advantage_estimator=my_adv.nothing"], tmp_path))
    _, batch = prompt_batch(tiny)
    spec = {"_target_": "my_adv.longer_first", "weight": 0.5}
    module = build_module(
        "grpo", copy.deepcopy(tiny[0]), tiny[1], num_generations=2, max_completion_length=6, advantage_estimator=spec
    )
    module.rewards = [("length", lambda p, c, **kw: length_reward(p, c, target=3))]
    torch.manual_seed(0)
    gen = module.generate_batch(batch)
    samples, _, rewards, _ = module.sample_and_score(batch)  # keyed sampling: the same answers again
    lengths = samples.mask.sum(1).to(rewards.dtype)
    assert torch.equal(gen["advantages"], 0.5 * (lengths - lengths.mean()) + rewards)


# -- kl_in_reward: −β·k1 on every token's reward, carried by the advantages -----------------------------
def test_kl_in_reward_moves_into_the_advantages_and_out_of_the_loss(tiny):
    from alignlab.online.rewards import length_reward

    _, batch = prompt_batch(tiny)
    settings = dict(num_generations=4, beta=0.5, max_completion_length=6, kl_in_reward=True)
    module = build_module("grpo", copy.deepcopy(tiny[0]).double(), tiny[1], advantage_estimator="rloo", **settings)
    module.rewards = [("length", lambda p, c, **kw: length_reward(p, c, target=3))]
    with torch.no_grad():  # a reference unlike the policy, so the KL is not 0
        for p in module.reference.copy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    torch.manual_seed(0)
    gen = module.generate_batch(batch)
    samples, texts, rewards, _ = module.sample_and_score(batch)  # keyed sampling: the same answers again
    assert texts == gen["texts"]
    length = samples.mask.shape[1]
    old = token_logprobs(module.model, samples.seqs, samples.starts, length) * samples.mask
    ref = token_logprobs(module.reference, samples.seqs, samples.starts, length) * samples.mask
    k1 = ((old - ref) * samples.mask).sum(1)
    assert k1.abs().min() > 1e-6
    expected = estimate_advantages(rewards - 0.5 * k1, 4, "rloo")  # RLOO's advantages of reward − β·Σ k1
    torch.testing.assert_close(gen["advantages"], expected, rtol=1e-10, atol=1e-12)
    assert not torch.allclose(gen["advantages"], estimate_advantages(rewards.double(), 4, "rloo"))
    assert gen["old_logprobs"] is None  # one iteration: the update's ratio stays exactly 1
    assert gen["stats"]["kl"].item() == pytest.approx(kl_reward_penalty(old, ref, samples.mask, 1.0)[1].item())
    assert module.loss_beta == 0.0
    optimizer = torch.optim.SGD(module.model.parameters(), lr=0.0)
    assert "kl" not in module.grpo_update(gen, optimizer)  # no KL term in the loss: the step logs the reward's


# -- DAPO dynamic sampling -------------------------------------------------------------------------
def fake_round(indices: list[int], rewards_by_row: dict, g: int = 2, episodes: bool = False):
    """What sample_and_score returns for prompts `indices`: answer j to row r is the tokens [r, j]; with
    `episodes`, row r's answers are multi-turn, [r, j, tool result × r, 7], trained on r, j and 7 only."""
    prompts = [[1, 2] for _ in indices for _ in range(g)]
    if not episodes:
        responses = [[10 + r, j] for r in indices for j in range(g)]
        samples = pack(prompts, responses, torch.ones(len(responses), dtype=torch.bool), 0, torch.device("cpu"))
    else:
        responses = [[10 + r, j, *[99] * r, 7] for r in indices for j in range(g)]
        masks = [torch.tensor([1.0, 1.0, *[0.0] * r, 1.0]) for r in indices for _ in range(g)]
        samples = pack(prompts, responses, torch.ones(len(responses), dtype=torch.bool), 0, "cpu", masks=masks)
    rewards = torch.tensor([rewards_by_row[r][j] for r in indices for j in range(g)], dtype=torch.float64)
    texts = [f"{r}/{j}" for r in indices for j in range(g)]
    return samples, texts, rewards, {"fn": rewards.clone()}


def dynamic_module(tiny, rewards_by_row: dict, extra_rows: list[list[int]], max_resample_times=3):
    module = build_module("grpo", copy.deepcopy(tiny[0]), tiny[1], num_generations=2, dynamic_sample=True)
    module.max_resample_times = max_resample_times
    draws = iter(extra_rows)
    module.sample_and_score = lambda batch: fake_round(batch["index"].tolist(), rewards_by_row)
    module.draw_prompts = lambda count, round_, exclude: (
        None if (rows := next(draws, None)) is None else {"index": torch.tensor(rows)}
    )
    return module


SIGNAL, FLAT = [1.0, 0.0], [1.0, 1.0]


def test_dynamic_sampling_replaces_every_zero_variance_group_and_keeps_the_batch_size(tiny):
    rewards = {0: SIGNAL, 1: FLAT, 2: FLAT, 3: SIGNAL, 4: FLAT, 5: FLAT, 6: SIGNAL, 7: [0.5, 0.0]}
    module = dynamic_module(tiny, rewards, [[4, 5, 6, 5], [7, 5, 5, 5]])
    batch = {"index": torch.tensor([0, 1, 2, 3])}
    out = module.dynamic_sampling(batch, *fake_round([0, 1, 2, 3], rewards))
    samples, texts, r, per_fn, rounds = out
    assert rounds == 2  # round 1 found one more group with signal (row 6), round 2 the last one (row 7)
    assert texts == ["0/0", "0/1", "3/0", "3/1", "6/0", "6/1", "7/0", "7/1"]  # the 4 with signal, in order
    assert len(texts) == 8 and samples.seqs["input_ids"].shape[0] == 8  # batch_size × G, as always
    assert (r.view(-1, 2).std(1) > 0).all() and torch.equal(per_fn["fn"], r)
    assert r.tolist() == [1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 0.5, 0.0]
    assert samples.responses[4] == [16, 0] and samples.mask.shape == (8, 2)


def test_dynamic_sampling_fills_with_zero_variance_groups_only_when_nothing_else_was_found(tiny):
    rewards = {0: SIGNAL, 1: FLAT, 2: FLAT, 3: FLAT, 4: [0.0, 2.0], 5: FLAT}
    module = dynamic_module(tiny, rewards, [[4, 5], [5, 5], [5, 5], [5, 5]], max_resample_times=2)
    out = module.dynamic_sampling({"index": torch.tensor([0, 1, 2])}, *fake_round([0, 1, 2], rewards))
    assert out[4] == 2 and out[1] == ["0/0", "0/1", "4/0", "4/1", "1/0", "1/1"]  # the limit: 2 rounds, then filled

    module = dynamic_module(tiny, rewards, [])  # no rows left to draw: the first sample as it is
    first = fake_round([0, 1, 2], rewards)
    out = module.dynamic_sampling({"index": torch.tensor([0, 1, 2])}, *first)
    assert out[4] == 0 and out[1] == first[1]

    module = dynamic_module(tiny, {0: SIGNAL, 1: SIGNAL}, [[5, 5]])  # every group has signal: nothing drawn
    first = fake_round([0, 1], {0: SIGNAL, 1: SIGNAL})
    out = module.dynamic_sampling({"index": torch.tensor([0, 1])}, *first)
    assert out[0] is first[0] and out[4] == 0


def test_dynamic_sampling_keeps_each_episodes_trained_tokens(tiny):
    """Multi-turn rows carry masks with tool results at 0: the selected rows keep them, not 1 on every token."""
    rewards = {0: FLAT, 1: SIGNAL, 2: FLAT, 3: SIGNAL}
    module = dynamic_module(tiny, rewards, [[3, 2]])
    module.sample_and_score = lambda batch: fake_round(batch["index"].tolist(), rewards, episodes=True)
    samples, texts, *_ = module.dynamic_sampling(
        {"index": torch.tensor([0, 1])}, *fake_round([0, 1], rewards, episodes=True)
    )
    assert texts == ["1/0", "1/1", "3/0", "3/1"]
    assert samples.responses[2] == [13, 0, 99, 99, 99, 7]
    assert samples.mask.tolist() == [
        [1.0, 1.0, 0.0, 1.0, 0.0, 0.0],
        [1.0, 1.0, 0.0, 1.0, 0.0, 0.0],
        [1.0, 1.0, 0.0, 0.0, 0.0, 1.0],
        [1.0, 1.0, 0.0, 0.0, 0.0, 1.0],
    ]


def test_dynamic_sampling_draws_fresh_training_rows_reproducibly(tiny):
    """draw_prompts: a seeded draw of rows the step has not used, the same on a second call."""
    from types import SimpleNamespace

    dm, batch = prompt_batch(tiny, batch_size=2, n_train=12)
    module = build_module("grpo", copy.deepcopy(tiny[0]), tiny[1], num_generations=2, dynamic_sample=True)
    module._trainer = SimpleNamespace(datamodule=dm, world_size=1, global_rank=0)
    from alignlab.algorithms.grpo import PromptDraws

    assert any(isinstance(c, PromptDraws) for c in module.configure_callbacks())
    PromptDraws().on_fit_start(module._trainer, module)  # hands the module the DataModule's draw
    try:
        exclude = set(batch["index"].tolist())
        first = module.draw_prompts(2, 0, exclude)
        assert module.draw_prompts(2, 0, exclude)["index"].tolist() == first["index"].tolist()
        assert not exclude & set(first["index"].tolist()) and first["prompt_input_ids"].shape[0] == 2
        assert first["prompt_messages"] and "columns" in first
        assert module.draw_prompts(2, 0, set(range(11))) is None  # one row left for two prompts
    finally:
        module._trainer = None


def test_a_short_run_with_every_option_trains_and_logs_the_resamples(tmp_path):
    """RLOO + KL in the reward + dynamic sampling + soft overlong + reference syncs through train()."""
    from alignlab.train import train

    result = train(
        compose(
            [
                "algorithm=grpo",
                "trainer.max_steps=2",
                "batch_size=2",
                "algorithm.num_generations=2",
                "algorithm.max_completion_length=4",
                "algorithm.beta=0.04",
                "algorithm.advantage_estimator=rloo",
                "algorithm.kl_in_reward=true",
                "algorithm.dynamic_sample=true",
                "algorithm.max_resample_times=1",
                "algorithm.sync_ref_model=true",
                "algorithm.ref_model_sync_steps=1",
                "algorithm.reward_funcs=[accuracy,soft_overlong]",
                "algorithm.soft_cache_length=2",
                "algorithm.num_sample_generations=0",
                "evaluation.exact_match=false",
                *QUIET,
            ],
            tmp_path / "run",
        )
    )
    metrics = result["metrics"]
    assert result["steps"] == 2
    assert metrics["train/num_resamples"] in (0.0, 1.0) and "train/frac_reward_zero_std" in metrics
    assert "train/kl" in metrics


# -- sync_ref_model: the reference follows the policy (TR-DPO) ---------------------------------------
def test_sync_ref_model_mixes_the_weights_exactly_at_every_sync_step(tiny):
    module = build_module(
        "grpo",
        copy.deepcopy(tiny[0]).double(),
        tiny[1],
        beta=0.04,
        sync_ref_model=True,
        ref_model_sync_steps=2,
        ref_model_mixup_alpha=0.25,
    )
    optimizer = torch.optim.SGD(module.model.parameters(), lr=0.1)
    snapshot = lambda m: {n: p.detach().clone() for n, p in m.named_parameters()}  # noqa: E731
    for step in range(1, 5):
        ref_before = snapshot(module.reference.copy)
        for p in module.model.parameters():
            p.grad = torch.ones_like(p)
        module.optimizer_step_manually(optimizer)
        policy, ref_after = snapshot(module.model), snapshot(module.reference.copy)
        for name, before in ref_before.items():
            if step % 2:  # not a sync step: the reference stays
                assert torch.equal(ref_after[name], before), (step, name)
            else:
                torch.testing.assert_close(ref_after[name], 0.25 * policy[name] + 0.75 * before, rtol=0, atol=1e-15)
    assert module.optimizer_steps == 4
    assert any(not torch.equal(ref_after[n], policy[n]) for n in policy)  # α < 1: it follows, it is not copied

    checkpoint = {}
    module.on_save_checkpoint(checkpoint)  # a resumed run continues from the moved reference
    fresh = build_module("grpo", copy.deepcopy(tiny[0]).double(), tiny[1], beta=0.04, sync_ref_model=True)
    fresh.on_load_checkpoint(checkpoint)
    moved = dict(module.reference.copy.named_parameters())
    assert all(torch.equal(p, moved[n]) for n, p in fresh.reference.copy.named_parameters())
    assert fresh.optimizer_steps == 4


def test_a_disabled_adapter_reference_refuses_to_sync():
    policy = torch.nn.Linear(2, 2)
    reference = ReferenceModel(policy)
    reference.copy = None  # as with LoRA: the policy with its adapter disabled
    with pytest.raises(ValueError, match="with LoRA the reference is the policy with its adapter disabled"):
        reference.mix_in(policy, 0.5)
