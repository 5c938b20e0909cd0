"""Keyed sampling: draws follow softmax(logits / T) exactly, and a row's answer depends on its key
alone, not on the batch or process it is sampled in."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

from alignlab.online.generation import KeyedSampling, generate, keyed_uniform, sample_keys


def test_keyed_draws_follow_the_tempered_softmax():
    n, temperature = 100_000, 0.7
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0, 0.5, -30.0])
    keys = sample_keys(seed=3, step=0, rows=torch.arange(n))
    picked = KeyedSampling(keys, temperature, prompt_length=0)(torch.zeros(n, 1, dtype=torch.long), logits.repeat(n, 1))
    assert ((picked == 0).sum(1) == 1).all() and torch.isinf(picked).sum(1).eq(len(logits) - 1).all()
    freq = torch.bincount(picked.argmax(1), minlength=len(logits)).double() / n
    p = torch.softmax(logits.double() / temperature, 0)
    sigma = (p * (1 - p) / n).sqrt()
    assert ((freq - p).abs() <= 5 * sigma + 1e-12).all(), (freq, p)
    assert freq[-1] == 0  # a token with probability ~e^-43 is never drawn


def test_uniform_numbers_are_uniform_and_depend_on_key_and_position():
    keys = sample_keys(seed=0, step=0, rows=torch.arange(50_000))
    u = keyed_uniform(keys, position=0)
    assert 0 < u.min() and u.max() < 1
    assert abs(u.mean().item() - 0.5) < 0.005 and abs(u.var().item() - 1 / 12) < 0.002
    histogram = torch.histc(u.float(), bins=10, min=0, max=1) / len(u)
    assert (histogram - 0.1).abs().max() < 0.006
    assert torch.equal(u, keyed_uniform(keys.clone(), position=0))
    assert (u != keyed_uniform(keys, position=1)).float().mean() > 0.999
    other_step = keyed_uniform(sample_keys(seed=0, step=1, rows=torch.arange(50_000)), position=0)
    other_seed = keyed_uniform(sample_keys(seed=1, step=0, rows=torch.arange(50_000)), position=0)
    assert (u != other_step).float().mean() > 0.999 and (u != other_seed).float().mean() > 0.999
    assert torch.corrcoef(torch.stack([u, other_step]))[0, 1].abs() < 0.02


def test_keys_are_per_row_and_per_sample():
    keys = sample_keys(seed=0, step=5, rows=torch.tensor([7, 2, 9]), num_per_prompt=4)
    assert keys.shape == (12,) and len(set(keys.tolist())) == 12
    # row 2's four keys do not depend on which other rows share the batch
    assert torch.equal(keys[4:8], sample_keys(seed=0, step=5, rows=torch.tensor([2]), num_per_prompt=4))


def test_a_rows_answer_does_not_depend_on_its_batch(tiny):
    """The same prompt with the same key gets the same sampled answer in a batch of 8 and in batches
    of 3 and 5 (other rows, other padding), while different keys give different answers."""
    from alignlab.data.collate import collate_prompts
    from alignlab.data.tokenize import encode_prompts

    model, tokenizer = tiny
    prompts = encode_prompts(tokenizer, [[{"role": "user", "content": f"{i * 7}+{i}="}] for i in range(8)])
    keys = sample_keys(seed=0, step=0, rows=torch.arange(8))

    def answers(rows):
        batch = collate_prompts([prompts[i] for i in rows], tokenizer.pad_token_id)
        out = generate(
            model, tokenizer, batch["prompt_input_ids"], batch["prompt_attention_mask"], 6, True, 1.0, keys[rows]
        )
        return [tuple(t for t in row if t != tokenizer.pad_token_id) for row in out.tolist()]

    whole = answers(list(range(8)))
    assert whole == answers([0, 1, 2]) + answers([3, 4, 5, 6, 7])
    assert answers([4, 0]) == [whole[4], whole[0]]
    assert len(set(whole)) > 4  # an untrained model at temperature 1: the draws differ


def test_shared_prefix_sampling_gives_generates_answers(tiny):
    """Encoding each prompt once and copying its KV cache to its completions samples exactly what
    generate() with the keyed processor samples from the repeated prompts."""
    from alignlab.data.collate import collate_prompts
    from alignlab.data.tokenize import encode_prompts
    from alignlab.online.generation import sample_shared_prefix, stop_token_ids

    model, tokenizer = tiny
    prompts = encode_prompts(tokenizer, [[{"role": "user", "content": "x" * (3 * i) + f"{i}+{i}="}] for i in range(5)])
    batch = collate_prompts(prompts, tokenizer.pad_token_id)  # left-padded, prompts of different lengths
    keys = sample_keys(seed=0, step=3, rows=torch.arange(5), num_per_prompt=4)
    ids, mask = batch["prompt_input_ids"], batch["prompt_attention_mask"]
    stops, pad = stop_token_ids(model, tokenizer), tokenizer.pad_token_id
    shared = sample_shared_prefix(model, ids, mask, 4, 8, 1.0, keys, stops, pad)
    plain = generate(model, tokenizer, ids.repeat_interleave(4, 0), mask.repeat_interleave(4, 0), 8, True, 1.0, keys)
    assert shared.shape == plain.shape == (20, 8)
    assert torch.equal(shared, plain)
    assert len({tuple(r) for r in shared.tolist()}) > 10  # the 20 draws mostly differ


@pytest.fixture
def deprecations_are_errors(monkeypatch):
    """Every deprecation `transformers` announces raises: its warnings (FutureWarning,
    DeprecationWarning) and the ones it only logs (e.g. reading `out.past_key_values`)."""
    import logging

    def fail_on_deprecation(original):
        def log(self, msg, *args, **kwargs):
            if "deprecat" in str(msg).lower():
                raise AssertionError(f"deprecated transformers call: {msg}")
            return original(self, msg, *args, **kwargs)

        return log

    for name in ("warning", "warning_once"):
        if hasattr(logging.Logger, name):
            monkeypatch.setattr(logging.Logger, name, fail_on_deprecation(getattr(logging.Logger, name)))
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        warnings.simplefilter("error", DeprecationWarning)
        yield


@pytest.mark.parametrize("lora", [False, True])
def test_hot_paths_make_no_deprecated_transformers_call(tiny, lora, deprecations_are_errors):
    """Keyed sampling (a KV cache passed back each step), generate() and answer_logprobs (both paths)
    run with deprecations as errors, on a plain and a LoRA-wrapped policy."""
    from omegaconf import OmegaConf

    from alignlab.data.collate import collate_answers, collate_prompts
    from alignlab.data.tokenize import encode_prompts
    from alignlab.models.loading import apply_lora
    from alignlab.models.logprobs import answer_logprobs
    from alignlab.online.generation import sample_shared_prefix, stop_token_ids

    model, tokenizer = tiny
    if lora:
        with warnings.catch_warnings():  # building the wrapper is not the hot path
            warnings.simplefilter("ignore")
            lora_cfg = OmegaConf.create({"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": "all-linear"})
            model = apply_lora(copy.deepcopy(model), lora_cfg)
    prompts = encode_prompts(tokenizer, [[{"role": "user", "content": f"{i}+{i}="}] for i in range(3)])
    batch = collate_prompts(prompts, tokenizer.pad_token_id)
    ids, mask = batch["prompt_input_ids"], batch["prompt_attention_mask"]
    keys = sample_keys(seed=0, step=0, rows=torch.arange(3), num_per_prompt=2)
    stops = stop_token_ids(model, tokenizer)
    shared = sample_shared_prefix(model, ids, mask, 2, 5, 1.0, keys, stops, tokenizer.pad_token_id)
    assert shared.shape[0] == 6 and 1 <= shared.shape[1] <= 5
    plain = generate(model, tokenizer, ids.repeat_interleave(2, 0), mask.repeat_interleave(2, 0), 5, True, 1.0, keys)
    assert torch.equal(shared, plain)
    greedy = generate(model, tokenizer, ids, mask, 5)
    assert greedy.shape[0] == 3
    scored = collate_answers(prompts, [[5, 6, tokenizer.eos_token_id]] * 3, tokenizer.pad_token_id)
    fast = answer_logprobs(model, scored)
    full = answer_logprobs(model, scored, by_forward=True)
    fast.logps.sum().backward()
    assert torch.allclose(fast.logps, full.logps, atol=1e-4)
