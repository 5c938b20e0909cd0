"""Answer log-probs, the frozen reference (copy vs disabled LoRA adapter) and the DPO module's loss."""

from __future__ import annotations

import copy

import pytest
import torch
from omegaconf import OmegaConf

from alignlab.data.collate import collate_answers
from alignlab.losses import dpo_loss
from alignlab.models.loading import apply_lora
from alignlab.models.logprobs import answer_logprobs, selective_log_softmax
from alignlab.models.reference import ReferenceModel
from tests.conftest import build_module


def pair_batch(tokenizer):
    from alignlab.data.tokenize import encode_answers, encode_prompts

    prompts = encode_prompts(
        tokenizer, [[{"role": "user", "content": "3+4="}], [{"role": "user", "content": "10+25="}]]
    )
    chosen = encode_answers(tokenizer, ["7", "35"])
    rejected = encode_answers(tokenizer, ["9", "34 and more"])
    batch = collate_answers(prompts + prompts, chosen + rejected, tokenizer.pad_token_id)
    batch["index"] = torch.arange(2)
    return batch


def test_selective_log_softmax_matches_log_softmax():
    logits = torch.randn(3, 5, 11, dtype=torch.float64)
    index = torch.randint(0, 11, (3, 5))
    expected = torch.log_softmax(logits, -1).gather(-1, index.unsqueeze(-1)).squeeze(-1)
    assert torch.allclose(selective_log_softmax(logits, index), expected)


def test_answer_logprobs_match_a_token_by_token_loop(tiny):
    model, tokenizer = tiny
    batch = pair_batch(tokenizer)
    out = answer_logprobs(model, batch)
    with torch.no_grad():
        for i in range(batch["input_ids"].shape[0]):
            n = int(batch["attention_mask"][i].sum())
            ids = batch["input_ids"][i, :n]
            logp = torch.log_softmax(model(input_ids=ids[None]).logits[0].double(), -1)
            answer_positions = batch["loss_mask"][i, :n].nonzero().flatten().tolist()
            expected = sum(logp[p - 1, ids[p]].item() for p in answer_positions)
            assert out.logps[i].item() == pytest.approx(expected, rel=1e-5)
            assert out.num_tokens[i].item() == len(answer_positions)
    # chosen "7" + eos = 2 tokens, rejected "34 and more" + eos = 12 tokens
    assert out.num_tokens.tolist() == [2, 3, 2, 12]


def test_lora_disabled_reference_equals_frozen_copy(tiny):
    model, tokenizer = tiny
    batch = pair_batch(tokenizer)
    frozen = ReferenceModel(copy.deepcopy(model))
    lora_cfg = OmegaConf.create({"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": "all-linear"})
    policy = apply_lora(copy.deepcopy(model), lora_cfg)
    with torch.no_grad():  # LoRA's B starts at zero; make the adapter change the output
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    disabled = ReferenceModel(policy)
    assert disabled.copy is None  # no second copy of the weights
    ref_a, ref_b = frozen.answer_logprobs(batch), disabled.answer_logprobs(batch)
    assert torch.allclose(ref_a.logps, ref_b.logps, atol=1e-5)
    with torch.no_grad():
        assert not torch.allclose(answer_logprobs(policy, batch).logps, ref_b.logps, atol=1e-3)


@pytest.mark.parametrize("rpo_alpha", [0.0, 1.0, 0.5])
@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_dpo_module_loss_is_preference_term_plus_weighted_nll(tiny, rpo_alpha, loss_type):
    model, tokenizer = tiny
    batch = pair_batch(tokenizer)
    module = build_module("dpo", copy.deepcopy(model), tokenizer, beta=0.1, rpo_alpha=rpo_alpha, loss_type=loss_type)
    with torch.no_grad():  # move the policy away from the reference so the rewards are not all zero
        for p in module.model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
        loss, metrics = module.compute(batch)
        pol = answer_logprobs(module.model, batch)
        ref = answer_logprobs(model, batch)
    pref = dpo_loss(
        pol.logps[:2].double(),
        pol.logps[2:].double(),
        ref.logps[:2].double(),
        ref.logps[2:].double(),
        beta=0.1,
        loss_type=loss_type,
    ).losses.mean()
    nll = -(pol.token_logps[:2].sum() / pol.mask[:2].sum()).double()
    assert loss.item() == pytest.approx((pref + rpo_alpha * nll).item(), rel=1e-5)
    assert metrics["nll_loss"].item() == pytest.approx(nll.item(), rel=1e-5)
    margins = 0.1 * ((pol.logps[:2] - ref.logps[:2]) - (pol.logps[2:] - ref.logps[2:]))
    assert metrics["rewards/margins"].item() == pytest.approx(margins.mean().item(), rel=1e-4, abs=1e-7)
    assert metrics["rewards/accuracies"].item() == (margins > 0).float().mean().item()


def test_cached_reference_logps_are_used_when_present(tiny):
    model, tokenizer = tiny
    batch = pair_batch(tokenizer)
    module = build_module("dpo", copy.deepcopy(model), tokenizer, rpo_alpha=0.0)
    with torch.no_grad():
        live, _ = module.compute(batch)
        ref = answer_logprobs(model, batch)
        batch.update(ref_chosen_logps=ref.logps[:2], ref_rejected_logps=ref.logps[2:])
        cached, _ = module.compute(batch)
    assert cached.item() == pytest.approx(live.item(), abs=1e-6)


def full_logits_reference(model, batch, temperature=1.0):
    """The plain computation: every position's full-vocabulary logits, log-softmax, gather."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1] / temperature
    logp = torch.log_softmax(logits, -1)
    mask = batch["loss_mask"][:, 1:].to(logp.dtype)
    token_logps = logp.gather(-1, batch["input_ids"][:, 1:].unsqueeze(-1)).squeeze(-1) * mask
    entropy = -(logp.exp() * logp).sum(-1) * mask
    mean_logits = (logits.mean(-1) * mask).sum(-1) / mask.sum(-1)
    return token_logps, entropy, mean_logits


@pytest.mark.parametrize("chunk_size", [1, 5, 0])
@pytest.mark.parametrize("lora", [False, True])
def test_chunked_answer_logprobs_equal_full_logits_in_value_and_gradient(tiny, chunk_size, lora):
    """Scoring only answer positions, a few at a time (logits recomputed in backward), gives the
    full-logits log-probs, entropies, mean logits and gradients, in float64."""
    model, tokenizer = tiny
    model = copy.deepcopy(model).double()
    if lora:
        model = apply_lora(
            model, OmegaConf.create({"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": "all-linear"})
        )
    batch = pair_batch(tokenizer)
    params = [p for p in model.parameters() if p.requires_grad]

    out = answer_logprobs(model, batch, temperature=0.7, entropy=True, chunk_size=chunk_size)
    (out.logps * torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=torch.float64)).sum().backward()
    grads = [p.grad.clone() for p in params]
    model.zero_grad()
    token_logps, entropy, mean_logits = full_logits_reference(model, batch, temperature=0.7)
    (token_logps.sum(-1) * torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=torch.float64)).sum().backward()

    assert torch.allclose(out.token_logps, token_logps, atol=1e-12)
    assert torch.allclose(out.token_entropy, entropy, atol=1e-12)
    assert torch.allclose(out.mean_logits, mean_logits, atol=1e-12)
    assert torch.equal(out.num_tokens, batch["loss_mask"][:, 1:].sum(-1).double())
    for p, g in zip(params, grads):
        assert torch.allclose(p.grad, g, atol=1e-10)


@pytest.mark.parametrize("chunk_size", [1, 0])
def test_entropy_with_gradients_on_request_equals_full_logits(tiny, chunk_size):
    """entropy_grad (GRPO's entropy bonus): the chunked entropy carries the full-logits entropy's
    gradient, in float64; without it the entropy is detached."""
    model, tokenizer = tiny
    model = copy.deepcopy(model).double()
    batch = pair_batch(tokenizer)
    params = list(model.parameters())
    assert not answer_logprobs(model, batch, entropy=True, chunk_size=chunk_size).token_entropy.requires_grad
    out = answer_logprobs(model, batch, temperature=0.7, entropy=True, chunk_size=chunk_size, entropy_grad=True)
    weights = torch.linspace(-1.0, 2.0, out.token_entropy.numel(), dtype=torch.float64).view_as(out.token_entropy)
    (out.token_entropy * weights).sum().backward()
    grads = [p.grad.clone() for p in params]
    model.zero_grad()
    _, entropy, _ = full_logits_reference(model, batch, temperature=0.7)
    (entropy * weights).sum().backward()
    assert torch.allclose(out.token_entropy, entropy, atol=1e-12)
    for p, g in zip(params, grads):
        assert torch.allclose(p.grad, g, atol=1e-10)
