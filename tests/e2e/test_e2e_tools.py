"""End to end: tool-calling GRPO on the bundled task (sums of two 6-digit numbers with the calculator).
SFT on correct traces teaches the call format and copying the numbers; GRPO with the `accuracy` reward
on whole episodes then raises held-out exact match of the final answer and the share of episodes whose
tool call gives the right sum (see docs/results.md, Tool-calling arithmetic).

Costly: the SFT start is 560 steps on ~110-token rows, then 40 GRPO steps of 2-turn episodes (see
docs/results.md for the time)."""

from __future__ import annotations

import pytest

from alignlab.train import train
from tests.conftest import QUIET, compose, eval_curve

pytestmark = [pytest.mark.slow, pytest.mark.long]  # minutes of CPU: outside the default suite

TOOLS = ["algorithm.tools=[alignlab.tools.calculator]", "algorithm.tool_call_format=hermes"]


@pytest.fixture(scope="module")
def tools_sft_run(tmp_path_factory) -> dict:
    """The measured SFT start: 400 steps (cosine schedule) learn the call's format, 160 more at a constant
    learning rate begin to copy the numbers right (docs/results.md, Tool-calling arithmetic)."""
    common = ["algorithm=sft", "data=arith_tools_sft", "batch_size=32", "evaluation.exact_match=false", *QUIET]
    first = train(
        compose(
            [*common, "trainer.max_steps=400", "trainer.val_check_interval=400"],
            tmp_path_factory.mktemp("tools-sft"),
        )
    )
    overrides = [
        *common,
        f"model.path={first['model_dir']}",
        "model.tiny=null",
        "optim.scheduler=constant",
        "trainer.max_steps=160",
        "trainer.val_check_interval=160",
        "evaluation.at_start=false",
    ]
    return train(compose(overrides, tmp_path_factory.mktemp("tools-sft-more")))


def test_grpo_with_the_calculator_raises_exact_match_and_correct_tool_calls(tools_sft_run, tmp_path):
    overrides = [
        f"model.path={tools_sft_run['model_dir']}",
        "model.tiny=null",
        "algorithm=grpo",
        "data=arith_tools_prompts",
        *TOOLS,
        "algorithm.max_completion_length=160",
        "algorithm.max_turns=3",
        "algorithm.temperature=0.5",
        "algorithm.reward_funcs=[accuracy,{_target_: alignlab.online.multiturn.tool_result_matches}]",
        "algorithm.reward_weights=[1.0,0.0]",
        "algorithm.num_sample_generations=0",
        "batch_size=16",
        "optim.lr=3e-4",
        "trainer.max_steps=40",
        "trainer.val_check_interval=40",
        "trainer.log_every_n_steps=5",
        *QUIET,
    ]
    train(compose(overrides, tmp_path))
    (_, start), (_, end) = eval_curve(tmp_path, "eval/exact_match")
    (_, calls_start), (_, calls_end) = eval_curve(tmp_path, "eval/rewards/tool_result_matches/mean")
    print(f"held-out exact match {start:.3f} -> {end:.3f}, correct calls {calls_start:.3f} -> {calls_end:.3f}")
    assert end >= start + 0.2, (start, end)  # measured 0.062 -> 0.508
    assert calls_end >= calls_start + 0.3, (calls_start, calls_end)  # measured 0.258 -> 0.922
