"""A reward that is NaN or infinite stops the run before the step, naming the reward function and the data
row, in every path that scores answers: PPO's rule rewards, GRPO's multi-turn episodes (a reward function
on the conversations, and an environment's own reward through `environment_reward`), and `async` reward
functions. (GKD scores no rewards.)"""

from __future__ import annotations

import asyncio
import copy
import math

import pytest
import torch

from alignlab.online.rewards import RewardFunctionError
from tests.algorithms.test_ppo import arith_batch
from tests.conftest import build_module

NUMBERS = [(123456, 654321), (100001, 2), (555555, 444444), (7, 8)]


def nan_for_the_last_prompt(prompts, completions, **columns):
    """NaN for every answer to the prompt "7+8=", 1.0 otherwise (prompts as message lists)."""
    return [math.nan if "7+8=" in str(p) else 1.0 for p in prompts]


async def async_inf_for_the_last_prompt(prompts, completions, **columns):
    await asyncio.sleep(0)
    return [math.inf if "7+8=" in str(p) else 0.5 for p in prompts]


class NaNJudge:
    """An environment that ends every episode after the policy's first turn, with reward NaN on "7+8="."""

    def reset(self, row):
        self.nan = "7+8=" in str(row["prompt"])
        return list(row["prompt"])

    def step(self, messages):
        return [], True, (math.nan if self.nan else 1.0)


def multi_turn_module(tiny_model_dir, **overrides):
    from transformers import AutoModelForCausalLM

    from alignlab.models.loading import tokenizer_from_pretrained

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tokenizer = tokenizer_from_pretrained(tiny_model_dir)
    args = dict(
        num_generations=2,
        beta=0.0,
        max_completion_length=160,
        tool_call_format="hermes",
        generation_backend={"_target_": "tests.algorithms.test_grpo_multiturn.ScriptedBackend"},
    )
    return build_module("grpo", model, tokenizer, **{**args, **overrides})


def prompt_batch() -> dict:
    prompts = [[{"role": "user", "content": f"{a}+{b}="}] for a, b in NUMBERS]
    return {"index": torch.arange(4), "prompt_messages": prompts, "columns": {"solution": [a + b for a, b in NUMBERS]}}


@pytest.mark.parametrize(
    ("overrides", "name", "value"),
    [
        (
            {
                "tools": ["alignlab.tools.calculator"],
                "reward_funcs": [{"_target_": f"{__name__}.nan_for_the_last_prompt"}],
            },
            "nan_for_the_last_prompt",
            "nan",
        ),
        (
            {
                "tools": ["alignlab.tools.calculator"],
                "reward_funcs": ["accuracy", {"_target_": f"{__name__}.async_inf_for_the_last_prompt"}],
            },
            "async_inf_for_the_last_prompt",
            "inf",
        ),
        (
            {
                "environment": f"{__name__}.NaNJudge",
                "reward_funcs": [{"_target_": "alignlab.online.multiturn.environment_reward"}],
            },
            "environment_reward",
            "nan",
        ),
    ],
    ids=["conversation reward", "async reward", "environment reward"],
)
def test_a_multi_turn_reward_that_is_not_finite_stops_naming_function_and_row(tiny_model_dir, overrides, name, value):
    module = multi_turn_module(tiny_model_dir, **overrides)
    before = [p.clone() for p in module.parameters()]
    with pytest.raises(RewardFunctionError) as err:
        module.generate_batch(prompt_batch())  # scored before any update
    message = str(err.value)
    assert message.startswith(f"reward function '{name}' returned {value} for completion 7 of 8, the answer ")
    assert "the data row whose prompt is '7+8='" in message and "a reward must be a finite number" in message
    assert all(torch.equal(a, b) for a, b in zip(before, module.parameters()))


def test_ppo_rule_reward_that_is_not_finite_stops_before_the_update(tiny):
    """PPO with rule rewards only: a NaN from one function, for one answer, stops the rollout (so no
    update) naming the function, the answer's position and its prompt."""
    model, tokenizer = tiny
    module = build_module("ppo", copy.deepcopy(model), tokenizer, reward_funcs=["accuracy"], response_length=6)
    batch = arith_batch(tokenizer)
    prompt = batch["prompt_messages"][2][-1]["content"]

    def nan_on_third(prompts, completions, **columns):
        return [math.nan if i == 2 else 0.0 for i in range(len(completions))]

    module.rewards = [("accuracy", module.rewards[0][1]), ("nan_on_third", nan_on_third)]
    module.weights = [1.0, 0.5]
    with pytest.raises(RewardFunctionError) as err:
        module.rollout(batch)
    message = str(err.value)
    assert message.startswith("reward function 'nan_on_third' returned nan for completion 3 of 4, the answer ")
    assert f"the data row whose prompt is {prompt!r}" in message
