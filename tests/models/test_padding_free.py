"""Padding-free answer log-probs: the batch's real tokens packed into rows with position_ids restarting
at 0 for each sequence give the padded batch's log-probs and gradients, on every architecture allowed;
other architectures are refused."""

from __future__ import annotations

import types
import warnings

import pytest
import torch

from alignlab.models import logprobs
from alignlab.models.logprobs import (
    PADDING_FREE_ARCHITECTURES,
    _packed,
    answer_logprobs,
    enable_padding_free,
    padding_free_refusal,
)
from tests.models.test_architectures import ARCHITECTURES, VOCAB, tiny_model

# Settings beyond test_architectures' for the packed tests: Mistral without its sliding window.
SETTINGS = {"mistral": dict(sliding_window=None)}


def uneven_batch() -> dict:
    """Five right-padded prompt + answer rows of very different lengths (40 down to 2 tokens), so that
    several short ones share a packed row and one row is almost all padding."""
    g = torch.Generator().manual_seed(2)
    lengths, prompt_lengths = [9, 40, 2, 23, 31], [4, 25, 1, 3, 20]
    ids = torch.zeros(len(lengths), max(lengths), dtype=torch.long)
    attention, loss_mask = torch.zeros_like(ids), torch.zeros_like(ids)
    for i, (n, p) in enumerate(zip(lengths, prompt_lengths)):
        ids[i, :n] = torch.randint(3, VOCAB, (n,), generator=g)
        attention[i, :n], loss_mask[i, p:n] = 1, 1
    return {"input_ids": ids, "attention_mask": attention, "loss_mask": loss_mask}


def scored(model, batch: dict, padding_free: bool, **kwargs):
    """(answer_logprobs output, gradients of the summed log-probs for every parameter)."""
    out = answer_logprobs(model, batch, padding_free=padding_free, **kwargs)
    params = [p for p in model.parameters() if p.requires_grad]
    return out, torch.autograd.grad(out.logps.sum(), params, allow_unused=True)


def assert_same(packed, padded, bound: float) -> None:
    (a, grads_a), (b, grads_b) = packed, padded
    assert torch.equal(a.mask, b.mask) and torch.equal(a.num_tokens, b.num_tokens)
    assert (a.token_logps - b.token_logps).abs().max() <= bound
    assert (a.logps - b.logps).abs().max() <= bound
    assert (a.mean_logits - b.mean_logits).abs().max() <= bound
    assert b.logps.abs().min() > 1  # not trivially zero
    for g, e in zip(grads_a, grads_b):
        if e is None:
            assert g is None
        else:
            assert (g - e).abs().max() <= bound * max(1.0, e.abs().max().item())


def test_packed_layout_fills_rows_first_fit_longest_first():
    """Lengths 3, 1, 4, 2 into rows of the longest (4): [4], [3, 1], [2] then pads; positions restart."""
    attention = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1], [1, 1, 0, 0]])
    ids = torch.arange(1, 17).view(4, 4) * attention
    packed_ids, positions, where = _packed(ids, attention)
    assert packed_ids.tolist() == [[9, 10, 11, 12], [1, 2, 3, 5], [13, 14, 0, 0]]
    assert positions.tolist() == [[0, 1, 2, 3], [0, 1, 2, 0], [0, 1, 0, 0]]
    keep = attention.bool()
    assert torch.equal(packed_ids.flatten()[where[keep]], ids[keep])  # where finds every real token


@pytest.mark.parametrize("model_type", sorted(PADDING_FREE_ARCHITECTURES))
def test_packed_log_probs_and_gradients_equal_the_padded_batch(model_type):
    """float64, sdpa: per-token and summed log-probs, mean logits and every parameter's gradient of the
    packed rows equal the padded batch's to 1e-10."""
    model = tiny_model(model_type, **SETTINGS.get(model_type, {}))
    assert model.config._attn_implementation == "sdpa" and padding_free_refusal(model) is None
    batch = uneven_batch()
    assert_same(scored(model, batch, True), scored(model, batch, False), bound=1e-10)


@pytest.mark.parametrize("model_type", ["qwen2", "llama"])
def test_eager_attention_and_one_packed_row(model_type, monkeypatch):
    """Eager attention (its softmax runs in float32 even for a float64 model, hence 1e-5), and every
    sequence in a single row (PACKED_ROW_TOKENS) give the padded numbers too."""
    model = tiny_model(model_type)
    model.set_attn_implementation("eager")
    batch = uneven_batch()
    padded = scored(model, batch, False)
    assert_same(scored(model, batch, True), padded, bound=1e-5)
    monkeypatch.setattr(logprobs, "PACKED_ROW_TOKENS", 10**6)
    assert _packed(batch["input_ids"], batch["attention_mask"])[0].shape == (1, 105)
    assert_same(scored(model, batch, True), padded, bound=1e-5)


def test_scoring_by_forward_entropy_and_temperature_packed():
    """The full-forward path, the entropy and a sampling temperature see the same packed numbers."""
    model = tiny_model("qwen2")
    batch = uneven_batch()
    a = answer_logprobs(model, batch, temperature=0.7, entropy=True, by_forward=True, padding_free=True)
    b = answer_logprobs(model, batch, temperature=0.7, entropy=True, by_forward=False, padding_free=False)
    assert (a.token_logps - b.token_logps).abs().max() <= 1e-10
    assert (a.token_entropy - b.token_entropy).abs().max() <= 1e-10


def test_other_architectures_and_attention_are_refused():
    """Not tested packed: an architecture off the list, sliding-window layers, another attention
    implementation. enable_padding_free warns once and leaves the model padded; asking answer_logprobs
    for packing anyway raises."""
    gemma = tiny_model("gemma2")
    with pytest.warns(UserWarning, match="gemma2.*stay padded"):
        assert not enable_padding_free(gemma)
    assert not getattr(gemma, "padding_free", False)
    with pytest.raises(ValueError, match="gemma2"):
        answer_logprobs(gemma, uneven_batch(), padding_free=True)
    assert "sliding-window" in padding_free_refusal(tiny_model("mistral"))  # sliding_window 4096 by default
    flash = types.SimpleNamespace(config=types.SimpleNamespace(model_type="qwen2", _attn_implementation="flash"))
    assert "'flash'" in padding_free_refusal(flash)
    assert set(PADDING_FREE_ARCHITECTURES) <= set(ARCHITECTURES)  # each is built by the tests above


@pytest.mark.parametrize("lora", [False, True])
def test_model_padding_free_marks_the_loaded_model(tiny_model_dir, lora, monkeypatch):
    """model.padding_free=true marks the loaded model; answer_logprobs reads the mark (through PEFT's
    wrapper with LoRA), the reference (a deep copy, or the policy itself with LoRA) keeps it, and the
    numbers are the padded ones (float32)."""
    from alignlab.models.loading import load_model
    from alignlab.models.reference import ReferenceModel
    from tests.models.test_model_math import pair_batch
    from tests.runner.test_hardware import model_cfg

    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # the tiny Qwen2 is allowed: no warning
        policy, tokenizer, _ = load_model(model_cfg(tiny_model_dir, **{"padding_free": True, "lora.enabled": lora}))
    assert policy.padding_free
    reference = ReferenceModel(policy)
    assert (reference.copy if reference.copy is not None else policy).padding_free
    batch = pair_batch(tokenizer)
    calls = []
    monkeypatch.setattr(logprobs, "_packed", lambda *a: calls.append(1) or _packed(*a))
    with torch.no_grad():
        packed, ref = answer_logprobs(policy, batch).logps, reference.answer_logprobs(batch).logps
        assert len(calls) == 2
        padded = answer_logprobs(policy, batch, padding_free=False).logps
    assert (packed - padded).abs().max() <= 1e-5 and (ref - padded).abs().max() <= 1e-5
    plain, _, _ = load_model(model_cfg(tiny_model_dir))  # the default: padded
    assert not getattr(plain, "padding_free", False)
