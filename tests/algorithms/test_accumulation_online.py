"""One optimizer step is the same step however it is cut, in the online paths that sample their own
answers: GKD's generalised JSD (a token mean over the step's answer tokens, on the data's answers and on
the student's own samples), and GRPO on multi-turn, tool-calling episodes, whose trained tokens are the
policy's only (the tool results inside an episode are masked out, so rows hold very different counts of
trained tokens) and whose engine's log-probs bring truncated importance weights.

Float64. The whole batch on one process = micro-batches of a few rows = micro-batches of a token budget
= 2 processes (each its half of the rows, the step's totals summed over both, gradients averaged as DDP
does), to 1e-6 relative.
"""

from __future__ import annotations

import copy

import pytest
import torch

from alignlab.data import SFTDataModule
from alignlab.losses.grpo import GRPO_LOSS_TYPES
from tests.algorithms.test_accumulation import LONG, relative, rows
from tests.algorithms.test_gkd import Capture, student, teacher_dir  # noqa: F401  (teacher_dir: a fixture)
from tests.conftest import ListSource


def two_processes(module, run, n: int, total) -> torch.Tensor:
    """The step's gradient on 2 emulated processes: each runs `run(rows)` on its half of the n rows, its
    step totals summed over both (`total`, the value sum_across_devices gives), and DDP's average."""
    module.sum_across_devices = lambda value: torch.as_tensor(total, dtype=value.dtype, device=value.device)
    module.loss_scale = lambda: 2.0
    grads = [run(slice(0, n // 2)), run(slice(n // 2, n))]
    del module.sum_across_devices, module.loss_scale
    return (grads[0] + grads[1]) / 2


# -- GKD ---------------------------------------------------------------------------------------------
def sft_rows(tokenizer, n: int = 8) -> dict:
    """n SFT rows, the first half with 1-2 token answers, the second with ~60 tokens, collated as a training batch."""
    data = [
        {
            "prompt": [{"role": "user", "content": f"{i}+{i}="}],
            "completion": LONG[: 50 + i] if i >= n // 2 else str(2 * i),
        }
        for i in range(n)
    ]
    dm = SFTDataModule(ListSource({"sft": data}), batch_size=n, shuffle=False)
    dm.set_tokenizer(tokenizer)
    dm.setup()
    return dm.collate(dm.splits["train"], with_prompts=False)


@pytest.mark.parametrize(
    ("lmbda", "seq_kd"), [(0.0, False), (1.0, False), (0.0, True)], ids=["data answers", "student samples", "seq_kd"]
)
def test_gkd_step_is_the_whole_batch_step_however_cut(tiny_model_dir, teacher_dir, lmbda, seq_kd):  # noqa: F811
    """Answers of 1 and ~60 tokens (the data's), or the student's own samples (lmbda=1, the same keyed
    samples in every run), or the teacher's (seq_kd): the step's mean divergence per answer token, whatever
    the cut."""
    module, tokenizer = student(tiny_model_dir, teacher_dir, lmbda=lmbda, seq_kd=seq_kd, beta=0.3, max_new_tokens=12)
    batch = sft_rows(tokenizer)
    n = len(batch["index"])

    def step(part: slice = slice(None), **cut) -> torch.Tensor:
        module.max_tokens_per_micro_batch, module.micro_batch_size = cut.get("budget"), cut.get("rows")
        optimizer = Capture(module)
        module.train_on({k: v[part] for k, v in batch.items()}, optimizer, None)
        return optimizer.grads[0]

    whole = step()
    assert whole.norm() > 1e-6
    for cut in ({"rows": 3}, {"rows": 1}, {"budget": 40}):
        assert relative(step(**cut), whole) < 1e-6, cut
    seqs, _ = module.answers_for(batch)
    total = seqs["loss_mask"][:, 1:].sum().double()  # the step's answer tokens over both processes
    assert relative(two_processes(module, lambda part: step(part, rows=2), n, total), whole) < 1e-6
    if (
        lmbda == 0.0 and not seq_kd
    ):  # the rows' answer tokens differ by far between the halves: a per-process mean would show
        halves = [batch["loss_mask"][p, 1:].sum().item() for p in (slice(0, n // 2), slice(n // 2, n))]
        assert max(halves) > 1.5 * min(halves)


# -- GRPO on multi-turn episodes with an engine's importance weights -----------------------------------
def tool_episodes(tiny_model_dir):
    """A GRPO module with the calculator and a scripted engine (tests.algorithms.test_grpo_multiturn): each
    episode is a tool call, the tool's result (masked out), and the answer; and one generation batch of
    4 prompts × 4 episodes, float64."""
    from transformers import AutoModelForCausalLM

    from alignlab.models.loading import tokenizer_from_pretrained
    from tests.conftest import build_module

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).double()
    tokenizer = tokenizer_from_pretrained(tiny_model_dir)
    module = build_module(
        "grpo",
        model,
        tokenizer,
        num_generations=4,
        beta=0.04,
        max_completion_length=160,
        tools=["alignlab.tools.calculator"],
        tool_call_format="hermes",
        generation_backend={"_target_": "tests.algorithms.test_grpo_multiturn.ScriptedEngine"},
        max_tokens_per_micro_batch=None,
    ).double()
    numbers = [(123456, 654321), (100001, 2), (555555, 444444), (7, 8)]
    prompts = [[{"role": "user", "content": f"{a}+{b}="}] for a, b in numbers]
    batch = {
        "index": torch.arange(4),
        "prompt_messages": prompts,
        "columns": {"solution": [a + b for a, b in numbers]},
    }
    torch.manual_seed(0)
    gen = module.generate_batch(batch)
    return module, {k: v for k, v in gen.items() if torch.is_tensor(v) or v is None}


def grpo_on_two_processes(module, gen: dict) -> torch.Tensor:
    """grpo_update's first step on 2 emulated processes, each its half of the rows: the step's policy tokens
    and completions summed over both (sum_across_devices is asked for them in that order), DDP's average."""
    from tests.algorithms.test_accumulation import update_gradient

    n, grads = len(gen["mask"]), []
    module.loss_scale = lambda: 2.0
    for part in (slice(0, n // 2), slice(n // 2, n)):
        answers = iter([gen["mask"].sum(), float(n)])
        module.sum_across_devices = lambda value, answers=answers: torch.as_tensor(next(answers), dtype=value.dtype)
        grads.append(update_gradient(module, rows(gen, part), world=1))
    del module.sum_across_devices, module.loss_scale
    return (grads[0] + grads[1]) / 2


def test_multi_turn_grpo_step_normalises_by_the_steps_policy_tokens(tiny_model_dir):
    """Episodes whose tool results are masked out (holes in each row's mask), some cut to their first
    trained token, so rows and micro-batches hold very different counts of policy tokens; the engine's
    truncated importance weights on every turn's tokens. Every loss_type: the whole batch = micro-batches
    of 2 and 5 rows = a token budget = 2 processes."""
    from tests.algorithms.test_accumulation import update_gradient

    module, gen = tool_episodes(tiny_model_dir)
    mask = gen["mask"]
    holes = [row for row in mask if (row[: int(row.nonzero().max())] == 0).any()]
    assert len(holes) == len(mask)  # every episode has masked tool tokens between its two turns
    assert gen["rollout_weights"] is not None and (gen["rollout_weights"][mask > 0] != 1).any()
    first = mask.cumsum(1) <= 1
    keep = torch.tensor([i % 3 == 0 for i in range(len(mask))]).unsqueeze(1)
    gen["mask"] = torch.where(keep, mask * first, mask)  # every third episode: one trained token
    gen["advantages"] = torch.linspace(-1.5, 1.5, len(mask), dtype=torch.float64)  # the scripted rewards tie
    for loss_type in GRPO_LOSS_TYPES:
        module.loss_type, module.epsilon_high = loss_type, (5.0 if loss_type == "cispo" else None)
        module.micro_batch_size, module.max_tokens_per_micro_batch = None, None
        whole = update_gradient(module, gen, world=1)
        assert whole.norm() > 1e-6, loss_type
        for cut in ({"micro_batch_size": 2}, {"micro_batch_size": 5}, {"max_tokens_per_micro_batch": 400}):
            for key, value in cut.items():
                setattr(module, key, value)
            assert relative(update_gradient(module, gen, world=1), whole) < 1e-6, (loss_type, cut)
            module.micro_batch_size, module.max_tokens_per_micro_batch = None, None
        module.micro_batch_size = 2
        split = grpo_on_two_processes(module, gen)
        assert relative(split, whole) < 1e-6, (loss_type, "2 processes")
        module.micro_batch_size = None


@pytest.mark.parametrize(
    "options",
    [
        {"top_entropy_quantile": 0.5},
        {"importance_sampling_level": "sequence"},
        {"entropy_coef": 0.01},
        {"delta": 1.5, "num_iterations": 2},
        {"off_policy_mask_threshold": 0.0, "num_iterations": 2},
        {"use_bias_correction_kl": True, "num_iterations": 2},
        {"kl_estimator": "k3+"},
    ],
    ids=[
        "top entropy",
        "sequence ratio",
        "entropy bonus",
        "two-sided clip, 2 iterations",
        "off-policy mask, 2 iterations",
        "ratio-weighted k3, 2 iterations",
        "k3+",
    ],
)
def test_multi_turn_grpo_options_take_the_whole_batch_step_however_cut(tiny_model_dir, options):
    """The token options on episodes with masked tool tokens: the top-entropy share over the step's policy
    tokens, GSPO's per-episode ratio, the entropy bonus, δ-clipping over 2 iterations (each step's
    gradient): the whole batch = micro-batches of 3 rows = a token budget, for dapo and grpo."""
    from tests.algorithms.test_accumulation import CaptureStep

    module, gen = tool_episodes(tiny_model_dir)
    first = gen["mask"].cumsum(1) <= 1
    keep = torch.tensor([i % 3 == 0 for i in range(len(first))]).unsqueeze(1)
    gen["mask"] = torch.where(keep, gen["mask"] * first, gen["mask"])
    gen["advantages"] = torch.linspace(-1.5, 1.5, len(first), dtype=torch.float64)
    if "num_iterations" in options:  # later iterations read the rollout's log-probs: moved off the policy's
        g = torch.Generator().manual_seed(1)
        gen["old_logprobs"] = (-torch.rand(gen["mask"].shape, generator=g, dtype=torch.float64)) * gen["mask"]
    for key, value in options.items():
        setattr(module, key, value)

    def steps(**cut) -> list[torch.Tensor]:
        module.micro_batch_size, module.max_tokens_per_micro_batch = cut.get("rows"), cut.get("budget")
        optimizer = CaptureStep(module, 1)  # keeps each step's gradient; the weights stay
        module.grpo_update(gen, optimizer)
        return optimizer.steps

    for loss_type in ("dapo", "grpo"):
        module.loss_type = loss_type
        whole = steps()
        assert len(whole) == module.num_iterations and all(w.norm() > 1e-6 for w in whole)
        for cut in ({"rows": 3}, {"budget": 400}):
            for got, want in zip(steps(**cut), whole):
                assert relative(got, want) < 1e-6, (loss_type, cut)


# -- PPO with rule rewards only ---------------------------------------------------------------------
def test_ppo_with_rule_rewards_only_takes_the_whole_batch_step_however_cut(tiny):
    """No reward model (reward_funcs=[accuracy]; the value model a copy of the policy): answers cut to 1
    and 6 tokens in turn; the first optimizer step of the whole batch = micro-batches of 1 and 3 rows = a
    token budget."""
    from tests.algorithms.test_accumulation import update_gradient
    from tests.algorithms.test_ppo import arith_batch
    from tests.conftest import build_module

    model, tokenizer = tiny
    module = build_module("ppo", copy.deepcopy(model).double(), tokenizer, reward_funcs=["accuracy"], response_length=6)
    module = module.double()
    torch.manual_seed(0)
    rollout = {k: v for k, v in module.rollout(arith_batch(tokenizer)).items() if torch.is_tensor(v) or v is None}
    n, length = rollout["mask"].shape
    keep = torch.tensor([1 if i % 2 else length for i in range(n)]).unsqueeze(1)
    rollout["mask"] = rollout["mask"] * (torch.arange(length) < keep)
    module.num_mini_batches, module.micro_batch_size, module.max_tokens_per_micro_batch = 1, None, None
    whole = update_gradient(module, rollout, world=1)
    assert whole.norm() > 1e-6
    for cut in ({"micro_batch_size": 1}, {"micro_batch_size": 3}, {"max_tokens_per_micro_batch": 20}):
        for key, value in cut.items():
            setattr(module, key, value)
        assert relative(update_gradient(module, rollout, world=1), whole) < 1e-6, cut
        module.micro_batch_size, module.max_tokens_per_micro_batch = None, None
