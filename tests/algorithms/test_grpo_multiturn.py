"""GRPO with tools: the multi-turn keys are checked before any model loads, PPO refuses them by name,
and a short run samples episodes, trains on the policy's tokens and logs the episodes' metrics."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest
import torch

from alignlab.data.arith_tools import tool_call_text
from alignlab.errors import ConfigError
from alignlab.online.backends import Sampled
from tests.conftest import QUIET, compose


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["algorithm.max_turns=0"], "algorithm.max_turns must be a whole number >= 1, got 0"),
        (["algorithm.tool_timeout=0"], "algorithm.tool_timeout must be > 0"),
        (["algorithm.tool_call_format=xml"], "algorithm.tool_call_format must be one of"),
        (["algorithm.tools=[alignlab.tools.nothing]"], "algorithm.tools[0]: 'alignlab.tools.nothing' could not be"),
        (["algorithm.tools=[calculator]"], "algorithm.tools[0]: expected a dotted path"),
        (["algorithm.environment=alignlab.tools.calculator"], "lacks reset and step"),
        (["algorithm.environment=nowhere.Env"], "algorithm.environment 'nowhere.Env' could not be imported"),
        (
            ["algorithm=ppo", "+algorithm.tools=[alignlab.tools.calculator]"],
            "algorithm.tools: multi-turn, tool-calling rollouts are GRPO's (algorithm=grpo; docs/tools.md); "
            "algorithm=ppo samples one answer per prompt and refuses them: its value targets over tool tokens",
        ),
    ],
)
def test_multi_turn_settings_are_checked_before_any_model_loads(overrides, message, tmp_path, monkeypatch):
    import alignlab.train

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded before the config was checked")

    monkeypatch.setattr(alignlab.train, "load_model", no_model)
    algorithm = [] if overrides[0].startswith("algorithm=") else ["algorithm=grpo"]
    with pytest.raises(ConfigError) as err:
        alignlab.train.train(compose([*algorithm, *overrides], tmp_path / "run"))
    assert message in str(err.value)


def test_a_template_without_a_call_format_needs_it_configured_before_anything_is_written(tmp_path, monkeypatch):
    import alignlab.train

    monkeypatch.setattr(alignlab.train, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    overrides = ["algorithm=grpo", "algorithm.tools=[alignlab.tools.calculator]", "trainer.max_steps=1", *QUIET]
    with pytest.raises(ConfigError, match="set algorithm.tool_call_format to one of"):
        alignlab.train.train(compose(overrides, tmp_path / "run"))
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())


def test_grpo_trains_on_multi_turn_episodes_and_logs_their_metrics(tmp_path):
    """Two steps on the bundled tool task with an environment that always answers (a simulated user, three
    assistant turns): sampling per turn, rewards on conversations (the environment's own among them), the
    masked update and the greedy multi-turn evaluation, through train()."""
    from alignlab.train import train

    overrides = [
        "algorithm=grpo",
        "data=arith_tools_prompts",
        "data.source.n_eval=4",
        "eval_batch_size=4",
        "batch_size=2",
        "algorithm.num_generations=2",
        "algorithm.max_completion_length=48",
        "algorithm.environment=tests.online.test_multiturn.CountingUser",
        "algorithm.max_turns=3",
        "algorithm.reward_funcs=[accuracy,{_target_: alignlab.online.multiturn.environment_reward}]",
        "algorithm.num_sample_generations=1",
        "trainer.max_steps=2",
        "trainer.val_check_interval=2",
        "trainer.log_every_n_steps=1",
        *QUIET,
    ]
    train(compose(overrides, tmp_path))
    with open(tmp_path / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    train_rows = [r for r in rows if r.get("train/loss")]
    eval_rows = [r for r in rows if r.get("eval/exact_match")]
    for name in ("num_turns", "tools/call_frequency", "tools/failure_frequency", "max_turns_ratio"):
        assert train_rows[-1].get(f"train/{name}") and eval_rows[-1].get(f"eval/{name}"), name
    assert eval_rows[-1].get("eval/rewards/environment_reward/mean")  # each function's mean over greedy episodes
    # the untrained model rarely ends a turn within the budget: one to three turns
    assert 1.0 <= float(train_rows[-1]["train/num_turns"]) <= 3.0
    assert float(train_rows[-1]["train/rewards/environment_reward/mean"]) in (0.0, 0.5, 1.0, 1.5, 2.0)
    samples = [json.loads(line) for line in (Path(tmp_path) / "samples.jsonl").read_text().splitlines()]
    assert samples and all(isinstance(s["answer"], str) for s in samples)  # the final answers
    for sample in samples:  # and the greedy episode after the prompt, as reward functions get it
        turns = [m for m in sample["conversation"] if m["role"] == "assistant"]
        assert sample["conversation"][0]["role"] == "assistant" and turns[-1]["content"] == sample["answer"]
        assert {m["role"] for m in sample["conversation"]} <= {"assistant", "user"}  # CountingUser says `again`


class ScriptedBackend:
    """A generation backend for the byte-level tiny tokenizer that plays a tool-using policy: it calls the
    calculator on the question, then answers the tool's result (an even key) or one more (an odd key)."""

    def sync(self, model):
        pass

    def sample(self, model, ids, attn, num_per_prompt, max_new_tokens, temperature, keys, stop_ids, pad_id):
        rows = []
        for i in range(ids.shape[0]):
            text = bytes(t for t in ids[i][attn[i].bool()].tolist() if t < 256).decode()
            for j in range(num_per_prompt):
                turn = self.turn(text, int(keys[i * num_per_prompt + j]) if keys is not None else 0)
                rows.append(list(turn.encode())[: max_new_tokens - 1] + [stop_ids[0]])
        width = max(map(len, rows))
        return torch.tensor([r + [pad_id] * (width - len(r)) for r in rows])

    def turn(self, text: str, key: int) -> str:
        """The next assistant turn after the conversation `text` so far, for one sampling key."""
        a, b = re.search(r"(\d+)\+(\d+)=", text).groups()
        result = re.search(r"tool\n(\d+)", text)
        return tool_call_text(int(a), int(b)) if result is None else str(int(result.group(1)) + key % 2)


class ScriptedEngine(ScriptedBackend):
    """ScriptedBackend as an engine (vLLM) answers: with a log-prob of -1 for every token it sampled."""

    def sample(self, model, ids, attn, num_per_prompt, max_new_tokens, temperature, keys, stop_ids, pad_id):
        tokens = super().sample(model, ids, attn, num_per_prompt, max_new_tokens, temperature, keys, stop_ids, pad_id)
        return Sampled(tokens, torch.full(tokens.shape, -1.0))


@pytest.mark.parametrize(
    ("backend", "dynamic"), [("ScriptedBackend", False), ("ScriptedBackend", True), ("ScriptedEngine", False)]
)
def test_grpo_with_the_calculator_trains_on_tool_calling_episodes(backend, dynamic, tmp_path):
    """Two steps with the calculator and a backend that calls it: every episode is two turns with one tool
    call, the final answers right about half the time; the update runs on the policy's tokens. With DAPO's
    dynamic sampling too (zero-variance groups replaced by fresh prompts' episodes), and with an engine's
    log-probs, corrected for over every turn's tokens (the sampling/* metrics)."""
    from alignlab.train import train

    overrides = [
        "algorithm=grpo",
        "data=arith_tools_prompts",
        "data.source.n_eval=2",
        "eval_batch_size=2",
        "batch_size=4",
        "algorithm.num_generations=4",
        "algorithm.max_completion_length=160",
        "algorithm.tools=[alignlab.tools.calculator]",
        "algorithm.tool_call_format=hermes",
        f"algorithm.generation_backend={{_target_: tests.algorithms.test_grpo_multiturn.{backend}}}",
        "algorithm.num_sample_generations=0",
        "evaluation.at_start=false",
        "trainer.max_steps=2",
        "trainer.val_check_interval=2",
        "trainer.log_every_n_steps=1",
        *QUIET,
        *(["algorithm.dynamic_sample=true", "algorithm.max_resample_times=2"] if dynamic else []),
    ]
    train(compose(overrides, tmp_path))
    with open(tmp_path / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("train/loss")]
    assert len(rows) == 2 and all(bool(r.get("train/num_resamples")) == dynamic for r in rows)
    engine = backend == "ScriptedEngine"  # the correction's weights over the policy's tokens of every turn
    assert all(bool(r.get("train/sampling/importance_sampling_ratio/mean")) == engine for r in rows)
    for row in rows:
        assert float(row["train/num_turns"]) == 2.0 and float(row["train/tools/call_frequency"]) == 1.0
        assert float(row["train/tools/failure_frequency"]) == 0.0 and float(row["train/max_turns_ratio"]) == 0.0
        assert 0.0 < float(row["train/reward"]) < 1.0 and float(row["train/loss"]) != 0.0
        assert float(row["train/completions/mean_length"]) < 100  # the policy's tokens: the tool's are not counted
