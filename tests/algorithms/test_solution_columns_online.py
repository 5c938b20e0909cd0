"""Every column reaches the multi-turn reward functions as the user wrote it: the case
shared/cases/grpo_solution_float (integer solutions, one 0.5) through a tool-calling GRPO rollout, where a
reward function on conversations, `accuracy` on the final answers and `tool_result_matches` all read the
`solution` column (5 stays 5, not 5.0)."""

from __future__ import annotations

import json
import re
from pathlib import Path

from alignlab.data import PromptDataModule
from alignlab.data.files import FileSource
from alignlab.online.multiturn import tool_result_matches
from alignlab.tools.calculator import calculator
from tests.algorithms.test_grpo_multiturn import ScriptedBackend
from tests.conftest import build_module

CASE = Path("/work/shared/cases/grpo_solution_float/prompts.jsonl")
SEEN: list = []


class ExactCaller(ScriptedBackend):
    """The scripted tool-using policy, exact: calls the calculator on the prompt's "a+b=" or "a/b=", then
    answers the tool's result as it is written."""

    def turn(self, text: str, key: int) -> str:
        result = re.search(r"tool\n([\d.]+)", text)
        if result is not None:
            return result.group(1)
        a, op, b = re.search(r"(\d+)([+/])(\d+)=", text).groups()
        call = {"name": "calculator", "arguments": {"expression": f"{a}{op}{b}"}}
        return f"<tool_call>{json.dumps(call, separators=(',', ':'))}</tool_call>"


def record(prompts, completions, solution=None, **columns):
    SEEN.extend((s, type(s).__name__) for s in solution)
    return [0.0] * len(completions)


def test_multi_turn_rewards_and_tool_result_matches_get_solutions_as_written(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from alignlab.models.loading import tokenizer_from_pretrained

    tokenizer = tokenizer_from_pretrained(tiny_model_dir)
    dm = PromptDataModule(FileSource(str(CASE), eval_fraction=0), batch_size=17, shuffle=False)
    dm.set_tokenizer(tokenizer)
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    written = [json.loads(line)["solution"] for line in CASE.read_text().splitlines()]
    module = build_module(
        "grpo",
        AutoModelForCausalLM.from_pretrained(tiny_model_dir),
        tokenizer,
        num_generations=2,
        beta=0.0,
        max_completion_length=120,
        tools=["alignlab.tools.calculator"],
        tool_call_format="hermes",
        generation_backend={"_target_": f"{__name__}.ExactCaller"},
        reward_funcs=[
            {"_target_": f"{__name__}.record"},
            "accuracy",
            {"_target_": "alignlab.online.multiturn.tool_result_matches"},
        ],
    )
    SEEN.clear()
    gen = module.generate_batch(batch)
    assert SEEN == [(s, type(s).__name__) for s in written for _ in range(2)]  # 5 stays int 5, 0.5 stays 0.5
    assert gen["stats"]["rewards/accuracy/mean"].item() == 1.0  # "5" is right for 5, "0.5" for 0.5
    assert gen["stats"]["rewards/tool_result_matches/mean"].item() == 1.0
    tool = [{"role": "tool", "content": calculator("2+3")}]
    assert tool_result_matches(None, [tool, tool, tool], solution=[5, 5.0, "5"]) == [1.0, 1.0, 1.0]
    assert tool_result_matches(None, [tool], solution=[0.5]) == [0.0]
