"""Answer log-probs equal log_softmax of each architecture's own forward, logit soft-capping and
scaling included, and an architecture whose forward does something unknown is caught on the first
batch and scored through its forward instead."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

from alignlab.models.logprobs import (
    _SCORED_BY_FORWARD,
    LOGIT_TRANSFORMS,
    answer_logprobs,
    architecture,
    check_answer_logprobs,
    logit_transform,
    scoring_rows,
)

VOCAB = 96
TINY = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=64,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
    experts_implementation="eager",  # the grouped-matmul experts take no float64
)
MOE = dict(num_local_experts=4, num_experts_per_tok=2)
# model_type → settings beyond TINY. Caps and scales are far from 1 so that leaving one out shows.
ARCHITECTURES = {
    "llama": {},
    "mistral": {},
    "qwen2": {},
    "qwen3": {},
    "gemma2": dict(final_logit_softcapping=5.0),
    "gemma3_text": dict(final_logit_softcapping=5.0),
    "vaultgemma": dict(final_logit_softcapping=5.0),
    "nanochat": dict(final_logit_softcapping=5.0),
    "beam": dict(final_logit_softcapping=5.0),
    "phi3": {},
    "gpt2": {},
    "olmo2": {},
    "cohere": dict(logit_scale=0.25),
    "cohere2": dict(logit_scale=0.25),
    "cohere2_moe": dict(logit_scale=0.25, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32),
    "granite": dict(logits_scaling=4.0),
    "granite_swa": dict(logits_scaling=4.0),
    "granitemoe": dict(logits_scaling=4.0, **MOE),
    "granitemoeshared": dict(logits_scaling=4.0, shared_intermediate_size=32, **MOE),
    "granitemoe_swa": dict(logits_scaling=4.0, **MOE),
    "minicpm3": dict(
        dim_model_base=16,  # logits_scaling = hidden_size / dim_model_base = 4
        num_key_value_heads=4,
        qk_nope_head_dim=8,
        qk_rope_head_dim=8,
        v_head_dim=16,
        q_lora_rank=32,
        kv_lora_rank=16,
    ),
    "hyperclovax": dict(logits_scaling=4.0),
}
# Architectures whose forward soft-caps in float32 whatever the model's dtype: compared at float32's precision.
FORWARD_IN_FLOAT32 = {"beam"}


def tiny_model(model_type: str, dtype=torch.float64, scale: float = 30.0, **settings):
    """A random tiny causal LM of `model_type` (config: TINY, its ARCHITECTURES entry, then `settings`)
    whose output weights are scaled by `scale`, so that its raw logits reach tens (past the soft caps above)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if model_type not in CONFIG_MAPPING:  # an older transformers than the one LOGIT_TRANSFORMS was read from
        pytest.skip(f"this transformers has no {model_type}")
    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, **{**TINY, **ARCHITECTURES[model_type], **settings})
    model = AutoModelForCausalLM.from_config(config).to(dtype).eval()
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(scale)
    return model


def answer_batch() -> dict:
    """Three right-padded prompt + answer rows of different lengths; answers marked by loss_mask."""
    g = torch.Generator().manual_seed(1)
    lengths, prompt_lengths = [12, 9, 7], [5, 3, 4]
    ids = torch.zeros(3, 12, dtype=torch.long)
    attention, loss_mask = torch.zeros_like(ids), torch.zeros_like(ids)
    for i, (n, p) in enumerate(zip(lengths, prompt_lengths)):
        ids[i, :n] = torch.randint(3, VOCAB, (n,), generator=g)
        attention[i, :n], loss_mask[i, p:n] = 1, 1
    return {"input_ids": ids, "attention_mask": attention, "loss_mask": loss_mask}


def forward_token_logps(model, batch: dict) -> torch.Tensor:
    """[N, T-1] log_softmax(model(...).logits) at the next tokens, 0 outside the answers."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    logps = torch.log_softmax(logits, -1).gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
    return logps * batch["loss_mask"][:, 1:]


def test_every_known_logit_transform_is_tested_here():
    assert set(LOGIT_TRANSFORMS) <= set(ARCHITECTURES)


@pytest.mark.parametrize("model_type", ARCHITECTURES)
def test_answer_logprobs_equal_the_models_forward(model_type):
    """float64, logits large enough to reach the soft caps: summed and per-token answer log-probs and
    their gradients equal those of log_softmax(model(...).logits) to 1e-6."""
    bound = 1e-4 if model_type in FORWARD_IN_FLOAT32 else 1e-6
    model = tiny_model(model_type)
    batch = answer_batch()
    transform = logit_transform(model)
    with torch.no_grad():
        raw = model.get_output_embeddings()(model.get_decoder()(input_ids=batch["input_ids"]).last_hidden_state)
    cap = ARCHITECTURES[model_type].get("final_logit_softcapping")
    if cap is not None:  # the cap bites: raw logits well past it
        assert transform.softcap == cap and raw.abs().max() > 3 * cap
    if model_type in LOGIT_TRANSFORMS and cap is None:  # a scale far from 1
        assert (transform.multiply or 1.0) / (transform.divide or 1.0) in (0.25, 4.0)

    out = answer_logprobs(model, batch)
    expected = forward_token_logps(model, batch)
    assert out.token_logps.dtype == torch.float64
    assert (out.token_logps - expected).abs().max() <= bound
    assert (out.logps - expected.sum(-1)).abs().max() <= bound
    assert out.num_tokens.tolist() == [7, 6, 3]
    assert expected.sum(-1).abs().min() > 5  # the sums are not trivially zero

    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(out.logps.sum(), params, allow_unused=True)
    expected_grads = torch.autograd.grad(expected.sum(), params, allow_unused=True)
    for g, e in zip(grads, expected_grads):
        if e is None:
            assert g is None or g.abs().max() == 0
        else:
            assert (g - e).abs().max() <= bound * max(1.0, e.abs().max().item())

    difference, tolerance = check_answer_logprobs(model, scoring_rows(batch, rows=3))
    assert difference <= tolerance and difference <= bound  # the start-up check passes the answer-only path


@pytest.mark.parametrize("model_type", ["gemma2", "cohere", "granite"])
def test_the_transform_runs_in_the_models_own_dtype(model_type):
    """bfloat16: the transform is applied to the output layer's bf16 logits before they become float32,
    as the model's forward does, so the answer-only path gives the forward's numbers. Applied after the
    cast (in float32) the soft-capped log-probs were 0.14 nats off; a bf16 step at logit 5 is 0.03."""
    model = tiny_model(model_type, dtype=torch.bfloat16)
    batch = answer_batch()
    out = answer_logprobs(model, batch)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
    expected = torch.log_softmax(logits, -1).gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
    expected = expected * batch["loss_mask"][:, 1:]
    assert out.token_logps.dtype == torch.float32
    assert (out.token_logps - expected).abs().max() <= 1e-5


def test_soft_capping_changes_the_numbers():
    """The Gemma-2 case from the issue: with the cap left out, the sums are far from the forward's."""
    from alignlab.models.logprobs import LogitTransform

    model = tiny_model("gemma2")
    batch = answer_batch()
    uncapped = copy.copy(LOGIT_TRANSFORMS)
    try:
        LOGIT_TRANSFORMS["gemma2"] = lambda config: LogitTransform()
        wrong = answer_logprobs(model, batch).logps
    finally:
        LOGIT_TRANSFORMS.clear()
        LOGIT_TRANSFORMS.update(uncapped)
    right = forward_token_logps(model, batch).sum(-1)
    assert (wrong - right).abs().min() > 5
    difference, tolerance = check_answer_logprobs(model, scoring_rows(batch))
    assert difference <= tolerance


def test_a_lora_wrapped_model_scores_through_its_base_architecture():
    from omegaconf import OmegaConf

    from alignlab.models.loading import apply_lora

    model = tiny_model("gemma2")
    lora = OmegaConf.create({"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": "all-linear"})
    policy = apply_lora(model, lora)
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    batch = answer_batch()
    assert architecture(policy).__name__ == "Gemma2ForCausalLM" and logit_transform(policy).softcap == 5.0
    out = answer_logprobs(policy, batch)
    assert (out.token_logps - forward_token_logps(policy, batch)).abs().max() <= 1e-6


def biased_llama_class():
    """A Llama whose forward adds a bias to its logits after the output layer: a transform alignlab
    has never heard of."""
    from transformers import LlamaForCausalLM

    class BiasedLlamaForCausalLM(LlamaForCausalLM):
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            bias = torch.linspace(-3.0, 3.0, out.logits.shape[-1], dtype=out.logits.dtype)
            out.logits = out.logits + bias.to(out.logits.device)
            return out

    return BiasedLlamaForCausalLM


def test_an_unknown_transform_is_caught_on_the_first_batch_and_scored_by_forward(tiny):
    """The AlignmentModule compares the two paths on its first training batch; where they differ it
    warns once, naming the architecture, and every later score (the policy's and its frozen copy's)
    comes from the model's forward."""
    from transformers import LlamaConfig

    from tests.conftest import build_module
    from tests.models.test_model_math import pair_batch

    _, tokenizer = tiny
    config = LlamaConfig(**{k: v for k, v in TINY.items() if k != "experts_implementation"})
    config.vocab_size = len(tokenizer)
    torch.manual_seed(0)
    model = biased_llama_class()(config)
    batch = pair_batch(tokenizer)
    module = build_module("dpo", model, tokenizer)
    assert architecture(model) not in _SCORED_BY_FORWARD
    wrong = answer_logprobs(model, batch).logps
    right = forward_token_logps(model, batch).sum(-1)
    assert (wrong - right).abs().max() > 0.1  # the answer-only path misses the bias

    try:
        with pytest.warns(UserWarning, match="BiasedLlamaForCausalLM") as record:
            module.on_train_batch_start(batch, 0)
            module.on_train_batch_start(batch, 1)  # once per run: no second check, no second warning
        assert len([w for w in record if "BiasedLlama" in str(w.message)]) == 1
        assert architecture(model) in _SCORED_BY_FORWARD
        assert (answer_logprobs(model, batch).logps - right).abs().max() < 1e-5
        ref = module.reference.answer_logprobs(batch)
        assert (ref.logps - right).abs().max() < 1e-5  # the frozen copy is the same architecture
        loss, _ = module.compute(batch)
        assert torch.isfinite(loss)
    finally:
        _SCORED_BY_FORWARD.discard(architecture(model))


def test_a_known_architecture_keeps_the_answer_only_path(tiny):
    from tests.conftest import build_module
    from tests.models.test_model_math import pair_batch

    model, tokenizer = tiny
    module = build_module("sft", copy.deepcopy(model), tokenizer)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        module.on_train_batch_start(pair_batch(tokenizer), 0)
    assert architecture(module.model) not in _SCORED_BY_FORWARD


def test_prompt_batches_are_checked_on_their_prompts():
    """PPO and GRPO train on prompts alone: the check scores the prompt tokens (left-padded)."""
    batch = {
        "prompt_input_ids": torch.tensor([[0, 0, 5, 6, 7], [8, 9, 10, 11, 12]]),
        "prompt_attention_mask": torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]]),
    }
    rows = scoring_rows(batch)
    assert rows["input_ids"].tolist() == [[5, 6, 7, 0, 0], [8, 9, 10, 11, 12]]  # right-padded
    assert rows["loss_mask"][:, 1:].tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]
    model = tiny_model("gemma2")
    difference, tolerance = check_answer_logprobs(model, rows)
    assert difference <= tolerance
