"""GRPO math against float64 references, reward functions, and config checks."""

from __future__ import annotations

import math

import pytest
import torch

from alignlab.errors import ConfigError
from alignlab.losses.grpo import CLIP_LOSS_TYPES, GRPO_LOSS_TYPES, group_advantages, grpo_loss, k3_kl
from alignlab.online.rewards import RewardFunctionError, build_reward_function, call_reward_function
from alignlab.runner.config import check_config
from tests.conftest import compose


def t(rows):
    return torch.tensor(rows, dtype=torch.float64)


def stdev(xs):
    m = sum(xs) / len(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_group_advantages_every_scaling(scale):
    rewards = [1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5, 3.0, 1.0, 2.0, 0.0]  # 3 prompts × G = 4
    out = group_advantages(t(rewards), 4, scale).tolist()
    expected = []
    for k in range(3):
        group = rewards[4 * k : 4 * k + 4]
        mean = sum(group) / 4
        for r in group:
            if scale == "group":
                expected.append((r - mean) / (stdev(group) + 1e-4))
            elif scale == "batch":
                expected.append((r - mean) / (stdev(rewards) + 1e-4))
            else:
                expected.append(r - mean)
    assert out == pytest.approx(expected, rel=1e-12, abs=1e-12)
    assert out[4:8] == [0.0] * 4  # a group with one reward gives no signal


def test_k3_kl_hand_checked_and_non_negative():
    logp, ref = t([[-1.0, -2.0]]), t([[-1.5, -2.0]])
    # diff = ref - logp = -0.5: e^-0.5 + 0.5 - 1
    assert k3_kl(logp, ref)[0, 0].item() == pytest.approx(math.exp(-0.5) + 0.5 - 1)
    assert k3_kl(logp, ref)[0, 1].item() == 0.0
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(50, generator=g, dtype=torch.float64), torch.randn(50, generator=g, dtype=torch.float64)
    assert (k3_kl(a, b) >= 0).all()


def reference_per_token(logp, old, adv, eps_low, eps_high, beta, ref):
    ratio = math.exp(logp - old)
    value = -min(ratio * adv, min(max(ratio, 1 - eps_low), 1 + eps_high) * adv)
    if beta:
        d = ref - logp
        value += beta * (math.exp(d) - d - 1)
    return value


@pytest.mark.parametrize("loss_type", CLIP_LOSS_TYPES)  # cispo and sapo: tests/losses/test_grpo_variants.py
@pytest.mark.parametrize(("eps_high", "beta"), [(None, 0.0), (0.28, 0.0), (None, 0.04)])
def test_grpo_loss_aggregations_match_reference(loss_type, eps_high, beta):
    g = torch.Generator().manual_seed(CLIP_LOSS_TYPES.index(loss_type))
    n, r = 6, 5
    logp = -torch.rand(n, r, generator=g, dtype=torch.float64) * 3
    old = logp + torch.randn(n, r, generator=g, dtype=torch.float64) * 0.3
    ref = logp + torch.randn(n, r, generator=g, dtype=torch.float64) * 0.3
    adv = torch.randn(n, generator=g, dtype=torch.float64)
    lengths = [5, 1, 3, 4, 2, 5]
    mask = t([[1.0] * k + [0.0] * (r - k) for k in lengths])
    out = grpo_loss(logp, old, adv, mask, 0.2, eps_high, beta, ref, loss_type, max_completion_length=8)
    high = 0.2 if eps_high is None else eps_high
    per = [
        [
            reference_per_token(logp[i, j].item(), old[i, j].item(), adv[i].item(), 0.2, high, beta, ref[i, j].item())
            for j in range(lengths[i])
        ]
        for i in range(n)
    ]
    if loss_type == "grpo":
        expected = sum(sum(row) / len(row) for row in per) / n
    elif loss_type in ("bnpo", "dapo"):
        expected = sum(map(sum, per)) / sum(lengths)
    else:
        expected = sum(map(sum, per)) / (n * 8)
    assert out.loss.item() == pytest.approx(expected, rel=1e-10)
    if beta:
        kls = [
            math.exp(ref[i, j] - logp[i, j]) - (ref[i, j] - logp[i, j]).item() - 1
            for i in range(n)
            for j in range(lengths[i])
        ]
        assert out.kl.item() == pytest.approx(sum(kls) / len(kls), rel=1e-10)


def test_ratio_is_exactly_one_with_one_iteration_and_the_gradient_matches():
    logp = t([[-1.0, -2.0, -0.5], [-0.3, -0.7, -9.0]]).requires_grad_(True)
    adv, mask = t([2.0, -1.0]), t([[1, 1, 1], [1, 1, 0]])
    out = grpo_loss(logp, logp.detach(), adv, mask, loss_type="dapo")
    assert out.clip_low.item() == out.clip_high.item() == 0.0
    assert out.loss.item() == pytest.approx(-(2.0 * 3 - 1.0 * 2) / 5)  # −Σ A·ρ / tokens with ρ = 1
    out.loss.backward()
    # d/dlogπ of −A·exp(logπ − stopgrad(logπ)) at ρ = 1 is −A, over 5 tokens
    assert logp.grad.tolist() == [pytest.approx([-0.4, -0.4, -0.4]), pytest.approx([0.2, 0.2, 0.0])]


def test_clip_ratios_count_the_clipped_side():
    logp, old = t([[0.0, 0.0, 0.0, 0.0]]), t([[0.5, -0.5, 0.5, -0.5]])  # ratios e^-0.5, e^0.5, ...
    out = grpo_loss(logp, old, t([-1.0]), t([[1, 1, 1, 1]]), epsilon=0.2)
    assert out.clip_low.item() == 0.5 and out.clip_high.item() == 0.0  # A < 0 and ρ < 0.8 on 2 of 4 tokens
    out = grpo_loss(logp, old, t([1.0]), t([[1, 1, 1, 1]]), epsilon=0.2)
    assert out.clip_high.item() == 0.5 and out.clip_low.item() == 0.0


def test_reward_functions_receive_extra_columns():
    name, fn = build_reward_function("accuracy")
    prompts = [[{"role": "user", "content": "1+1="}]] * 3
    assert call_reward_function(
        name, fn, prompts, ["2", " 2 ", "3"], {"solution": ["2", "2", "2"], "x": [1, 2, 3]}
    ) == [1.0, 1.0, 0.0]
    _, fmt = build_reward_function("format")
    assert fmt(prompts, ["12", "twelve", "-3"]) == [1.0, 0.0, 1.0]
    _, length = build_reward_function("length")
    assert length(prompts, ["12", "1", "12345"]) == [1.0, 0.5, 0.0]
    name, custom = build_reward_function(
        {"_target_": "tests.algorithms.test_grpo.column_echo", "name": "echo", "scale": 2.0}
    )
    assert name == "echo"
    assert call_reward_function(name, custom, prompts, ["a", "b", "c"], {"difficulty": [1, 2, 3]}) == [2.0, 4.0, 6.0]


def column_echo(prompts, completions, difficulty, scale=1.0, **columns):
    """A user reward function that reads an extra data column."""
    return [scale * d for d in difficulty]


def broken(prompts, completions, **columns):
    raise RuntimeError("no network")


def short(prompts, completions, **columns):
    return [1.0]


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("tests.algorithms.test_grpo.broken", "reward function 'broken' raised RuntimeError: no network"),
        ("tests.algorithms.test_grpo.short", "reward function 'short' returned 1 values for 3 completions"),
    ],
)
def test_a_failing_reward_function_is_named(target, message):
    name, fn = build_reward_function({"_target_": target})
    with pytest.raises(RewardFunctionError) as err:
        call_reward_function(name, fn, [[]] * 3, ["a", "b", "c"], {})
    assert message in str(err.value)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf"), None, "high"])
def test_a_reward_that_is_not_a_finite_number_names_the_function_and_the_row(bad):
    """NaN would make its group's advantages and the loss NaN; the run stops before the step instead."""

    def second_is_bad(prompts, completions, **columns):
        return [1.0, bad, 0.0]

    prompts = [[{"role": "user", "content": q}] for q in ("1+1=", "2+2=", "3+3=")]
    with pytest.raises(RewardFunctionError) as err:
        call_reward_function("second_is_bad", second_is_bad, prompts, ["2", "5", "6"], {})
    assert str(err.value) == (
        f"reward function 'second_is_bad' returned {bad!r} for completion 2 of 3, the answer '5' to the data row "
        "whose prompt is '2+2='; a reward must be a finite number: return e.g. 0.0 for an answer it cannot score"
    )


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["algorithm.num_generations=1"], "algorithm.num_generations must be a whole number >= 2, got 1"),
        (["algorithm.loss_type=sum"], "algorithm.loss_type must be one of"),
        (["algorithm.scale_rewards=median"], "algorithm.scale_rewards must be one of"),
        (["algorithm.beta=-0.1"], "algorithm.beta must be >= 0"),
        (["algorithm.reward_funcs=[nope]"], "unknown reward function 'nope'"),
        (["algorithm.reward_weights=[1.0,2.0]"], "algorithm.reward_weights has 2 weights for 1 reward functions"),
        (
            ["batch_size=5", "algorithm.num_generations=3", "algorithm.micro_batch_size=4"],
            "batch_size × algorithm.num_generations = 5 × 3 = 15 completions, which algorithm.micro_batch_size (4)",
        ),
        (
            ["algorithm.max_tokens_per_micro_batch=0"],
            "algorithm.max_tokens_per_micro_batch must be a whole number >= 1",
        ),
        (["algorithm.generation_backend=vllm"], "algorithm.generation_backend must be null or {_target_:"),
        (  # issue 32: it was set to 1 without a word, the weights as without it
            ["batch_size=4", "trainer.accumulate_grad_batches=2"],
            "trainer.accumulate_grad_batches=2 does not apply to algorithm=grpo",
        ),
        (["batch_size=4", "trainer.accumulate_grad_batches=2"], "set batch_size=8"),
        (
            ["algorithm.generation_backend={_target_:no.such.Engine}"],
            "algorithm.generation_backend 'no.such.Engine' could not be imported",
        ),
    ],
)
def test_grpo_config_errors_name_the_key(overrides, message, tmp_path):
    with pytest.raises(ConfigError) as err:
        check_config(compose(["algorithm=grpo", *overrides], tmp_path))
    assert message in str(err.value)


def test_a_reward_model_folder_is_a_reward_function(tiny, tmp_path):
    import copy

    from alignlab.score import RewardScorer
    from tests.conftest import build_module

    model, tokenizer = tiny
    folder = build_module("rm", copy.deepcopy(model), tokenizer).save_final(tmp_path)
    name, fn = build_reward_function(str(folder))
    assert name == "reward_model:model" and isinstance(fn, RewardScorer)
    prompts = [[{"role": "user", "content": "3+4="}], [{"role": "user", "content": "3+4="}]]
    values = call_reward_function(name, fn, prompts, ["7", "8"], {"solution": ["7", "7"]})
    assert values == pytest.approx(RewardScorer(folder).score(prompts, ["7", "8"]), abs=1e-6)


def test_dapo_with_every_completion_masked_out_is_zero_not_nan():
    logp = t([[-1.0, -2.0]]).requires_grad_(True)
    out = grpo_loss(logp, logp.detach(), t([1.0]), t([[0, 0]]), loss_type="dapo", num_items_in_batch=t([[0, 0]]).sum())
    out.loss.backward()
    assert out.loss.item() == 0.0 and torch.isfinite(logp.grad).all()


def test_reward_functions_receive_the_prompt_messages_and_columns(tiny):
    import copy

    from alignlab.data import PromptDataModule
    from alignlab.data.arith import ArithTask
    from tests.conftest import build_module

    model, tokenizer = tiny
    dm = PromptDataModule(ArithTask(n_train=8, n_eval=4), batch_size=2)
    dm.set_tokenizer(tokenizer)
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    seen = {}

    def spy(prompts, completions, solution, **columns):
        seen.update(prompts=prompts, solution=solution)
        return [0.0] * len(completions)

    module = build_module("grpo", copy.deepcopy(model), tokenizer, num_generations=2)
    module.rewards = [("spy", spy)]
    module.rewards_of(batch, ["1", "2", "3", "4"])
    assert seen["prompts"][0] == seen["prompts"][1] == batch["prompt_messages"][0]
    assert seen["prompts"][0][0]["role"] == "user" and seen["prompts"][0][0]["content"].endswith("=")
    assert seen["solution"] == [batch["columns"]["solution"][0]] * 2 + [batch["columns"]["solution"][1]] * 2


def length_rewarded_generation(tiny, dtype: torch.dtype = torch.float32, **overrides):
    """(a GRPO module on a copy of the tiny model in `dtype`, one generation batch of it): 4 completions
    to each of 3 arithmetic prompts, at most 6 tokens, rewarded for length so that groups differ."""
    import copy

    from alignlab.data import PromptDataModule
    from alignlab.data.arith import ArithTask
    from alignlab.online.rewards import length_reward
    from tests.conftest import build_module

    model, tokenizer = tiny
    dm = PromptDataModule(ArithTask(n_train=8, n_eval=4), batch_size=3)
    dm.set_tokenizer(tokenizer)
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    settings = {"num_generations": 4, "beta": 0.04, "max_completion_length": 6, **overrides}
    module = build_module("grpo", copy.deepcopy(model).to(dtype), tokenizer, **settings)
    module.rewards, module.weights = [("length", lambda p, c, **kw: length_reward(p, c, target=3))], [1.0]
    torch.manual_seed(0)
    gen = module.generate_batch(batch)
    assert gen["advantages"].abs().sum() > 0  # the rewards differ within groups: there is a gradient
    return module, gen


def updated(modules, gen: dict) -> list[dict]:
    """Each module's logged metrics after grpo_update on `gen` with SGD (lr 0.5)."""
    logged = []
    for module in modules:
        optimizer = torch.optim.SGD([p for p in module.parameters() if p.requires_grad], lr=0.5)
        logged.append(module.grpo_update(gen, optimizer))
    return logged


@pytest.mark.parametrize("loss_type", GRPO_LOSS_TYPES)
def test_micro_batches_take_the_step_one_big_batch_takes(tiny, loss_type):
    """algorithm.micro_batch_size: gradients accumulated over micro-batches give the weights and the
    logged loss of the whole generation batch at once (bnpo too: it divides by the step's tokens)."""
    import copy

    whole, gen = length_rewarded_generation(tiny, loss_type=loss_type, max_tokens_per_micro_batch=None)
    split = copy.deepcopy(whole)
    split.micro_batch_size = 4
    logged = updated((whole, split), gen)
    assert logged[1]["loss"].item() == pytest.approx(logged[0]["loss"].item(), rel=1e-5, abs=1e-7)
    assert logged[1]["kl"].item() == pytest.approx(logged[0]["kl"].item(), rel=1e-5, abs=1e-7)
    start = dict(tiny[0].named_parameters())
    moved = max((p - start[n]).abs().max().item() for n, p in whole.model.named_parameters())
    assert moved > 1e-4
    for (name, a), b in zip(whole.model.named_parameters(), split.model.parameters()):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("loss_type", GRPO_LOSS_TYPES)
def test_a_token_budget_takes_the_steps_one_big_batch_takes(tiny, loss_type):
    """algorithm.max_tokens_per_micro_batch: completions sorted by length and cut by padded tokens,
    each forward cut to its own longest row, give the weights (two optimizer steps, num_iterations=2:
    log-probs at generation time differ from the current ones) and every logged value of the whole
    generation batch at once, in float64 to 1e-10."""
    import copy

    whole, gen = length_rewarded_generation(
        tiny, torch.float64, loss_type=loss_type, num_iterations=2, max_tokens_per_micro_batch=None
    )
    lengths, width = gen["attention_mask"].sum(1), gen["attention_mask"].shape[1]
    split = copy.deepcopy(whole)
    budget = split.max_tokens_per_micro_batch = 3 * int(lengths.max())
    cut = split.micro_batches(gen["attention_mask"])
    assert len(cut) >= 4 and all(len(rows) * int(lengths[rows].max()) <= budget for rows in cut)
    widths = []  # what each forward of the update runs over
    split.model.get_decoder().register_forward_pre_hook(
        lambda m, args, kwargs: widths.append(kwargs["input_ids"].shape[1]), with_kwargs=True
    )
    logged = updated((whole, split), gen)
    assert widths == [int(lengths[rows].max()) for rows in cut] * 2 and min(widths) < width
    for key, value in logged[0].items():
        assert logged[1][key].item() == pytest.approx(value.item(), rel=1e-10, abs=1e-12), key
    for (name, a), b in zip(whole.model.named_parameters(), split.model.parameters()):
        torch.testing.assert_close(b, a, atol=1e-12, rtol=1e-10, msg=name)
    assert not torch.equal(whole.model.lm_head.weight, tiny[0].lm_head.weight.double())  # the steps moved it


def test_every_process_cuts_as_many_micro_batches_as_the_one_that_needs_the_most(tiny, monkeypatch):
    """DDP synchronises each backward pass, so the processes must take as many: one whose rows need
    fewer micro-batches halves its most padded ones (alignlab.online.micro_batches)."""
    import copy

    from tests.conftest import build_module

    module = build_module("grpo", copy.deepcopy(tiny[0]), tiny[1], max_tokens_per_micro_batch=20)
    mask = (torch.arange(9) < torch.tensor([5, 9, 3, 9, 4, 7]).unsqueeze(1)).long()  # rows of 5, 9, 3, ... tokens
    assert [rows.tolist() for rows in module.micro_batches(mask)] == [[1, 3], [0, 5], [2, 4]]
    another_needs_5 = lambda counts: torch.cat([counts, torch.tensor([5])])  # noqa: E731
    monkeypatch.setattr(module, "gather_across_devices", another_needs_5)
    assert [rows.tolist() for rows in module.micro_batches(mask)] == [[1], [3], [5], [0], [2, 4]]


class FixedAnswers:
    """A generation backend that answers every prompt with the same tokens and records its syncs."""

    def __init__(self, tokens: list[int]):
        self.tokens, self.synced = tokens, []

    def sync(self, model):
        self.synced.append(model)

    def sample(self, model, prompt_input_ids, prompt_attention_mask, num_per_prompt, max_new_tokens, *rest):
        stop_ids = rest[-2]  # every token that ends an answer; the first is the template's end of turn
        return torch.tensor([*self.tokens, stop_ids[0]]).repeat(prompt_input_ids.shape[0] * num_per_prompt, 1)


def test_a_configured_generation_backend_samples_the_answers(tiny):
    """algorithm.generation_backend={_target_: ...}: the class samples every answer and is handed the
    policy before each rollout (where an inference engine would copy its weights)."""
    import copy

    from alignlab.data import PromptDataModule
    from alignlab.data.arith import ArithTask
    from tests.conftest import build_module

    model, tokenizer = tiny
    dm = PromptDataModule(ArithTask(n_train=8, n_eval=4), batch_size=3)
    dm.set_tokenizer(tokenizer)
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    spec = {
        "_target_": "tests.algorithms.test_grpo.FixedAnswers",
        "tokens": tokenizer.encode("7", add_special_tokens=False),
    }
    module = build_module("grpo", copy.deepcopy(model), tokenizer, num_generations=2, generation_backend=spec)
    gen = module.generate_batch(batch)
    assert gen["texts"] == ["7"] * 6
    assert gen["mask"].sum(-1).tolist() == [2.0] * 6  # "7" and eos
    module.generate_batch(batch)
    assert module.backend.synced == [module.model, module.model]


# -- a run that earns no reward signal says so (issue 32 item 22) -------------------------------------------


def test_rollouts_without_reward_signal_warn_once_naming_the_usual_causes(tiny, caplog):
    from tests.conftest import build_module

    module = build_module("grpo", *tiny)
    zero = torch.tensor(0.0)
    for _ in range(module.flat_rollouts_warning - 1):
        module.watch_reward_signal(True, zero)
    module.watch_reward_signal(False, torch.tensor(0.5))  # one rollout with signal starts the count again
    assert module.run_warnings == []
    with caplog.at_level("WARNING", logger="alignlab.algorithms.grpo"):
        for _ in range(2 * module.flat_rollouts_warning):
            module.watch_reward_signal(True, zero)
    assert len(module.run_warnings) == 1 and len(caplog.records) == 1  # once
    message = module.run_warnings[0]
    assert message.startswith(f"GRPO: in {module.flat_rollouts_warning} rollouts in a row every group of ")
    assert "mean reward 0;" in message and "frac_reward_zero_std = 1" in message
    assert "never answers right" in message and "cannot match" in message and "column" in message


def test_a_short_run_with_no_reward_signal_says_so_in_its_summary(tmp_path, capsys):
    from alignlab.train import train

    overrides = [
        "algorithm=grpo",
        "algorithm.reward_funcs=[{_target_:alignlab.online.rewards.format_reward,pattern:NEVER}]",  # always 0
        "algorithm.max_completion_length=2",
        "algorithm.num_generations=2",
        "batch_size=2",
        "trainer.max_steps=2",
        "evaluation.at_start=false",
        "save_model=false",
        "logger=csv",
        "trainer.enable_progress_bar=false",
    ]
    result = train(compose(overrides, tmp_path))
    assert result["steps"] == 2 and len(result["warnings"]) == 1
    assert result["warnings"][0].startswith("GRPO: in 2 rollouts in a row every group of 2 completions got the same")
    assert "  warning: GRPO: in 2 rollouts" in capsys.readouterr().out


def test_the_kl_options_reach_grpo_loss(tiny, monkeypatch):
    """algorithm.kl_estimator and use_bias_correction_kl are what the update's KL term is computed with
    (alignlab.losses.rlhf.kl_loss_term; its gradients: tests/losses/test_kl_gradient.py)."""
    import alignlab.algorithms.grpo as grpo_algorithm

    module, gen = length_rewarded_generation(tiny, kl_estimator="k1", use_bias_correction_kl=True, num_iterations=2)
    seen, real = [], grpo_algorithm.grpo_loss
    monkeypatch.setattr(grpo_algorithm, "grpo_loss", lambda *a, **kw: seen.append(kw) or real(*a, **kw))
    logged = updated([module], gen)[0]
    assert len(seen) == 2 and all(kw["kl_estimator"] == "k1" and kw["use_bias_correction_kl"] for kw in seen)
    assert logged["kl"].item() != 0.0
