"""The policy trains in training mode, as TRL's trainers do (`from_pretrained` returns eval mode and
Lightning keeps submodule modes): validation runs in eval mode, frozen models stay in eval mode,
`disable_dropout` (TRL's name and defaults) zeroes every dropout so two training-mode passes agree,
and transformers' gradient checkpointing really recomputes, with the same loss and gradient."""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import lightning as L
import pytest
import torch

from alignlab.data import PairwiseDataModule, SFTDataModule
from alignlab.models.logprobs import answer_logprobs
from alignlab.models.modes import disable_dropout
from alignlab.models.reference import ReferenceModel
from tests.conftest import ListSource, build_module


def rows(kind: str, n: int = 8) -> list[dict]:
    prompts = [[{"role": "user", "content": f"{i}+{i}="}] for i in range(n)]
    if kind == "sft":
        return [{"prompt": p, "completion": str(2 * i)} for i, p in enumerate(prompts)]
    return [{"prompt": p, "chosen": str(2 * i), "rejected": str(2 * i + 1)} for i, p in enumerate(prompts)]


def datamodule(kind: str, tokenizer):
    dm = {"sft": SFTDataModule, "pairwise": PairwiseDataModule}[kind](
        ListSource({kind: rows(kind)}), batch_size=4, eval_batch_size=4, shuffle=False
    )
    dm.set_tokenizer(tokenizer)
    dm.setup()
    return dm


def a_batch(tokenizer) -> dict:
    dm = datamodule("sft", tokenizer)
    dm.trainer = SimpleNamespace(accumulate_grad_batches=1, training=True)
    return dm.on_before_batch_transfer(next(iter(dm.train_dataloader())), 0)


def fit(module, kind: str, tokenizer, **settings) -> L.Trainer:
    trainer = L.Trainer(
        **{"max_steps": 2, "limit_val_batches": 0, "num_sanity_val_steps": 0, **settings},
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    trainer.fit(module, datamodule=datamodule(kind, tokenizer))
    return trainer


def record_compute(module) -> list[tuple]:
    """Wrap module.compute (called inside training_step and validation_step) to record, at each call,
    (stage, the policy's mode, whether every module of the tree is in it, the reference copy's mode)."""
    seen, compute = [], module.compute

    def recording(batch):
        modes = {m.training for m in module.modules()}
        reference = module.reference.copy.training if module.reference is not None else None
        seen.append(("train" if module.trainer.training else "eval", module.model.training, len(modes) == 1, reference))
        return compute(batch)

    module.compute = recording
    return seen


# -- (a) training mode inside training_step, eval mode inside validation_step -------------------------
@pytest.mark.parametrize(("name", "kind"), [("sft", "sft"), ("dpo", "pairwise"), ("rm", "pairwise")])
def test_the_policy_trains_in_training_mode_and_validates_in_eval_mode(tiny_model_dir, tiny, name, kind):
    from transformers import AutoModelForCausalLM

    tokenizer = tiny[1]
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert not model.training  # as from_pretrained gives it
    # DPO keeps its reference copy (not freed after scoring every row once), to check it stays in eval mode
    module = build_module(name, model, tokenizer, **({"precompute_ref_log_probs": False} if name == "dpo" else {}))
    seen = record_compute(module)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(module, kind, tokenizer, limit_val_batches=1, val_check_interval=1, num_sanity_val_steps=1)
    reference = False if name == "dpo" else None  # the frozen copy stays in eval mode throughout
    # the sanity check, then each training step followed by a validation; validation returns to training mode
    validating, training = ("eval", False, True, reference), ("train", True, True, reference)
    assert seen == [validating, training, validating, training, validating]
    assert not [w for w in caught if "in eval mode at the start of training" in str(w.message)]
    assert not module.model.training  # back in eval mode after fitting, as it came


# -- (b) disable_dropout ---------------------------------------------------------------------------
def dropout_model(architecture: str, tiny_model_dir, tokenizer):
    """A tiny causal LM whose config has dropout 0.5: the embedded Qwen2 with attention_dropout (a float
    its attention reads at forward time), or a random GPT-2 (nn.Dropout modules)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if architecture == "qwen2":
        return AutoModelForCausalLM.from_pretrained(tiny_model_dir, attention_dropout=0.5)
    config = AutoConfig.for_model(
        "gpt2", vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=2, n_positions=256,
        resid_pdrop=0.5, embd_pdrop=0.5, attn_pdrop=0.5, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config)


@pytest.mark.parametrize(("architecture", "count"), [("qwen2", 2), ("gpt2", 7)])
def test_disable_dropout_zeroes_dropout_modules_and_attention_floats(tiny_model_dir, tiny, architecture, count):
    """Qwen2: each layer's attention_dropout; GPT-2: the embedding dropout and each block's attention,
    residual and MLP dropouts. The config keeps its values (an exported model keeps them)."""
    model = dropout_model(architecture, tiny_model_dir, tiny[1])
    assert disable_dropout(model) == count and disable_dropout(model) == 0
    assert (model.config.attention_dropout if architecture == "qwen2" else model.config.resid_pdrop) == 0.5
    assert disable_dropout(tiny[0]) == 0  # the tiny model has none: the default job is unchanged


@pytest.mark.parametrize("architecture", ["qwen2", "gpt2"])
@pytest.mark.parametrize(("name", "deterministic"), [("dpo", True), ("sft", False)])
def test_two_training_mode_passes_agree_with_disable_dropout_and_differ_without(
    tiny_model_dir, tiny, architecture, name, deterministic
):
    """DPO's default disable_dropout=true: the same log-probs twice in training mode; SFT's default
    false: dropout applies, as it does in TRL's SFT."""
    tokenizer = tiny[1]
    module = build_module(name, dropout_model(architecture, tiny_model_dir, tokenizer), tokenizer)
    assert module.disable_dropout is deterministic
    batch, policy = a_batch(tokenizer), module.model.train()
    with torch.no_grad():
        first, second = answer_logprobs(policy, batch).logps, answer_logprobs(policy, batch).logps
    assert torch.equal(first, second) is deterministic
    with torch.no_grad():  # eval mode never drops out
        policy.eval()
        assert torch.equal(answer_logprobs(policy, batch).logps, answer_logprobs(policy, batch).logps)


def test_the_lora_reference_reads_the_training_policy_without_dropout(tiny_model_dir, tiny):
    """With LoRA the reference is the policy with its adapter disabled: scored in eval mode, and the
    policy left in training mode."""
    from peft import LoraConfig, get_peft_model

    tokenizer = tiny[1]
    policy = get_peft_model(
        dropout_model("qwen2", tiny_model_dir, tokenizer),
        LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.5),
    ).train()
    reference, batch = ReferenceModel.of(policy), a_batch(tokenizer)
    assert reference.copy is None
    assert torch.equal(reference.answer_logprobs(batch).logps, reference.answer_logprobs(batch).logps)
    assert policy.training and all(m.training for m in policy.modules())


# -- (c) gradient checkpointing recomputes, and changes nothing numerically ------------------------------
def checkpointed_run(tiny_model_dir, tokenizer, checkpointing: bool) -> tuple[int, list, list]:
    """(training-mode calls of the first decoder layer's MLP, the losses, the gradients) of 2 SFT steps.
    transformers 5.24 checkpoints a layer's `forward`, so hooks on the layer itself run once, and torch
    stops a recomputation once it has the tensors backward needs (before the MLP returns): a pre-hook on
    the MLP counts it."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    if checkpointing:  # as alignlab.models.loading does for model.gradient_checkpointing=true
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    module = build_module("sft", model, tokenizer)
    calls, losses, grads = [0], [], []
    mlp = model.get_decoder().layers[0].mlp
    mlp.register_forward_pre_hook(lambda m, args: calls.__setitem__(0, calls[0] + m.training))
    compute = module.compute

    def recording(batch):
        loss, metrics = compute(batch)
        losses.append(loss.detach())
        return loss, metrics

    module.compute = recording

    class Gradients(L.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            grads.append(torch.cat([p.grad.flatten() for p in pl_module.parameters() if p.grad is not None]))

    module.configure_callbacks = lambda: [Gradients()]
    fit(module, "sft", tokenizer)
    return calls[0], losses, grads


def test_gradient_checkpointing_recomputes_each_layer_and_gives_the_same_loss_and_gradient(tiny_model_dir, tiny):
    plain = checkpointed_run(tiny_model_dir, tiny[1], checkpointing=False)
    checkpointed = checkpointed_run(tiny_model_dir, tiny[1], checkpointing=True)
    assert plain[0] == 2 and checkpointed[0] == 4  # 2 steps: once each, or forward and recomputed in backward
    for a, b in zip(plain[1], checkpointed[1], strict=True):
        assert torch.allclose(a, b, atol=1e-6)
    for a, b in zip(plain[2], checkpointed[2], strict=True):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-5)
