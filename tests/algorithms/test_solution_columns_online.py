"""Every column reaches the multi-turn reward functions as the user wrote it: the case
shared/cases/grpo_solution_float (integer solutions, one 0.5) through a tool-calling GRPO rollout, where a
reward function on conversations, `accuracy` on the final answers and `tool_result_matches` all read the
`solution` column (5 stays 5, not 5.0)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from alignlab.data import PromptDataModule
from alignlab.data.files import FileSource
from alignlab.online.multiturn import tool_result_matches
from alignlab.tools.calculator import calculator
from tests.conftest import build_module

CASE = Path("/work/shared/cases/grpo_solution_float/prompts.jsonl")
SEEN: list = []


class ExactCaller:
    """A scripted policy for the byte-level tiny tokenizer: calls the calculator on the prompt's "a+b=" or
    "a/b=", then answers the tool's result as it is written."""

    def sync(self, model):
        pass

    def sample(self, model, ids, attn, num_per_prompt, max_new_tokens, temperature, keys, stop_ids, pad_id):
        rows = []
        for i in range(ids.shape[0]):
            text = bytes(t for t in ids[i][attn[i].bool()].tolist() if t < 256).decode()
            result = re.search(r"tool\n([\d.]+)", text)
            if result is None:
                a, op, b = re.search(r"(\d+)([+/])(\d+)=", text).groups()
                call = {"name": "calculator", "arguments": {"expression": f"{a}{op}{b}"}}
                turn = f"<tool_call>{json.dumps(call, separators=(',', ':'))}</tool_call>"
            else:
                turn = result.group(1)
            rows += [list(turn.encode())[: max_new_tokens - 1] + [stop_ids[0]]] * num_per_prompt
        width = max(map(len, rows))
        return torch.tensor([r + [pad_id] * (width - len(r)) for r in rows])


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
