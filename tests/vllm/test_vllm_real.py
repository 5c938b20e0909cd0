"""vLLM for real, on the tiny model: GRPO sampling through an in-process engine (`vllm_mode=colocate`) and
through `python -m alignlab.vllm_serve` (`vllm_mode=server`, on 127.0.0.1, started and stopped here).

After every optimizer step the policy's weights are pushed and the engine's log-probs of the probe must
equal the trainer's; the engine's log-probs of the tokens it sampled must equal the trainer's too (float32
on CPU); and a short GRPO run on the length reward raises the reward under both modes. One engine per mode,
shared by the tests. Needs vLLM, so it runs in its own virtualenv (.ci/vllm; docs/vllm.md) and is skipped
elsewhere."""

from __future__ import annotations

import copy
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("vllm")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of KV cache per engine (vLLM's CPU default takes ~7)
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")  # pinned threads lose on a CPU shared with other jobs

from alignlab.data import PromptDataModule  # noqa: E402
from alignlab.data.arith import ArithTask  # noqa: E402
from alignlab.online.generation import sample_keys, stop_token_ids  # noqa: E402
from alignlab.online.rollout import token_logprobs  # noqa: E402
from alignlab.online.vllm_backend import ColocatedEngine, ServerEngine  # noqa: E402
from tests.conftest import build_module  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
STEPS, LR = 20, 3e-3  # 8 prompts × 8 completions of at most 8 tokens per step; from 0.13 to 0.5+ in process
# On CPU vLLM reads gpu_memory_utilization as its share of the machine's memory, checked free at start-up.
CPU_MEMORY = 0.1
LENGTH = {"_target_": "alignlab.online.rewards.length_reward", "target": 4, "name": "length"}


@pytest.fixture(scope="module")
def colocated(tiny_model_dir):
    return ColocatedEngine(str(tiny_model_dir), "float32", CPU_MEMORY, enforce_eager=True)


@pytest.fixture(scope="module")
def server_port(tiny_model_dir, tmp_path_factory):
    """alignlab.vllm_serve on 127.0.0.1 (the embedded tiny model), up to 10 minutes to start on 2 cores."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tmp_path_factory.mktemp("server") / "server.log"
    with open(log, "w") as out:
        command = [sys.executable, "-m", "alignlab.vllm_serve", "--host", "127.0.0.1", "--port", str(port)]
        process = subprocess.Popen(
            [*command, "--enforce-eager", "--gpu-memory-utilization", str(CPU_MEMORY)],
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
    try:
        deadline = time.monotonic() + 600
        while True:
            if process.poll() is not None:
                pytest.fail(f"alignlab.vllm_serve exited with {process.returncode}:\n{log.read_text()[-4000:]}")
            try:
                ServerEngine("127.0.0.1", port, timeout=5)
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
        yield port
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()


def prompts(tokenizer):
    dm = PromptDataModule(ArithTask(n_train=256, n_eval=4), batch_size=8)
    dm.set_tokenizer(tokenizer)
    dm.setup()
    return iter(dm.train_dataloader())


def grpo_run(module) -> list[float]:
    """STEPS rollouts and updates; after each weight push the probe's log-probs agree (vllm_sync_tolerance
    1e-4 stops the run otherwise, and each is checked here to 1e-5), and the engine's log-probs of its own
    samples equal the policy's. Returns the reward of each step."""
    optimizer = torch.optim.AdamW(module.model.parameters(), lr=LR)
    batches, rewards = prompts(module.tokenizer), []
    for step in range(STEPS):
        module.generation_batches = step
        gen = module.generate_batch(next(batches))
        assert module.backend.syncs == step + 1 and module.backend.probe_difference <= 1e-5, step
        stats = gen["stats"]
        assert stats["sampling/sampling_logp_difference/max"].item() < 1e-4, step
        assert abs(stats["sampling/importance_sampling_ratio/mean"].item() - 1) < 1e-4, step
        rewards.append(stats["reward"].item())
        module.grpo_update(gen, optimizer)
    return rewards


def grpo_module(tiny, **options):
    model, tokenizer = tiny
    torch.manual_seed(0)
    return build_module(
        "grpo",
        copy.deepcopy(model),
        tokenizer,
        num_generations=8,
        max_completion_length=8,
        reward_funcs=[LENGTH],
        use_vllm=True,
        vllm_sync_tolerance=1e-4,
        **options,
    )


def assert_learns(rewards: list[float]) -> None:
    first, last = sum(rewards[:4]) / 4, sum(rewards[-4:]) / 4
    print(f"reward {first:.3f} -> {last:.3f}: {[round(r, 3) for r in rewards]}")
    assert last > first + 0.15, rewards


def test_colocated_samples_repeat_and_match_the_trainer(tiny, colocated):
    """The same keys give the same answers (per-request seeds), and vLLM's log-probs of them at the sampling
    temperature are the trainer's."""
    module = grpo_module(tiny, vllm_mode="colocate", temperature=0.7)
    module.backend.engine = colocated
    module.backend.sync(module.model)
    batch = next(prompts(module.tokenizer))
    keys, stops = sample_keys(0, 3, batch["index"], 8), stop_token_ids(module.model, module.tokenizer)
    ids, mask = batch["prompt_input_ids"], batch["prompt_attention_mask"]
    args = (module.model, ids, mask, 8, 8, 0.7, keys, stops, module.tokenizer.pad_token_id)
    first, again = module.backend.sample(*args), module.backend.sample(*args)
    assert torch.equal(first.tokens, again.tokens) and torch.equal(first.logprobs, again.logprobs)
    assert len({tuple(r) for r in first.tokens.tolist()}) > 32  # 64 completions, distinct seeds
    samples = module.sample_answers(batch, 8, 256, 8)
    mask = samples.mask
    train = token_logprobs(module.model, samples.seqs, samples.starts, mask.shape[1], 0.7)
    assert ((train - samples.sampling_logprobs).abs() * mask).max().item() < 1e-4


def test_grpo_colocated_learns_with_the_probe_agreeing_after_every_step(tiny, colocated):
    module = grpo_module(tiny, vllm_mode="colocate")
    module.backend.engine = colocated  # the shared engine; the policy's weights are pushed at the first sync
    assert_learns(grpo_run(module))


def test_grpo_through_the_server_learns_with_the_probe_agreeing_after_every_step(tiny, server_port):
    module = grpo_module(tiny, vllm_mode="server", vllm_server_host="127.0.0.1", vllm_server_port=server_port)
    assert_learns(grpo_run(module))
