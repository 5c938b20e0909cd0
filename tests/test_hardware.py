"""Memory settings change memory, not results: gradient checkpointing gives the same loss and
gradients; QLoRA (4-bit base weights via bitsandbytes, LoRA adapters) trains and exports a
full-precision merged model."""

from __future__ import annotations

import json

import pytest
import torch
from omegaconf import OmegaConf

from alignlab.config import compose
from alignlab.logprobs import answer_logprobs
from alignlab.models.loading import load_model
from tests.conftest import QUIET
from tests.test_model_math import pair_batch


def model_cfg(tiny_model_dir, **settings):
    """The tiny model's config (model=tiny), loaded from its folder, with dotted keys overridden."""
    cfg = OmegaConf.create(OmegaConf.to_container(compose().model, resolve=True))
    for key, value in {"path": str(tiny_model_dir), "tiny": None, **settings}.items():
        OmegaConf.update(cfg, key, value)
    return cfg


@pytest.mark.parametrize("lora", [False, True])
def test_gradient_checkpointing_changes_nothing_numerically(tiny_model_dir, lora):
    def loss_and_grads(checkpointing):
        torch.manual_seed(0)
        model, tokenizer, _ = load_model(
            model_cfg(tiny_model_dir, **{"gradient_checkpointing": checkpointing, "lora.enabled": lora})
        )
        model.train()
        assert (model.get_base_model() if lora else model).is_gradient_checkpointing == checkpointing
        out = answer_logprobs(model, pair_batch(tokenizer))
        loss = -out.logps.sum()
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    plain, checkpointed = loss_and_grads(False), loss_and_grads(True)
    assert torch.allclose(plain[0], checkpointed[0], atol=1e-6)
    assert plain[1].keys() == checkpointed[1].keys() and plain[1]
    for name, grad in plain[1].items():
        assert torch.allclose(grad, checkpointed[1][name], atol=1e-6, rtol=1e-5), name


def test_qlora_trains_adapters_on_4bit_weights_and_exports_a_full_precision_model(tiny_model_dir, tmp_path):
    pytest.importorskip("bitsandbytes")
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model, _, _ = load_model(model_cfg(tiny_model_dir, **{"quantization": "4bit", "lora.enabled": True}))
    layer = model.get_base_model().model.layers[0].mlp.down_proj
    assert type(layer.base_layer).__name__ == "Linear4bit"
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)

    run = [
        "algorithm=sft",
        f"model.path={tiny_model_dir}",
        "model.tiny=null",
        "model.quantization=4bit",
        "model.lora.enabled=true",
        "optim.lr=3e-3",
        "trainer.max_steps=30",
        "trainer.val_check_interval=30",
        "evaluation.exact_match=false",
        *QUIET,
    ]
    from alignlab.train import train
    from tests.conftest import eval_curve

    result = train(compose(run, tmp_path))
    losses = eval_curve(tmp_path, "eval/loss")
    assert losses[0][0] == 0 and losses[-1][1] < losses[0][1] - 0.5, losses

    merged_dir = tmp_path / "model"
    assert "quantization_config" not in json.loads((merged_dir / "config.json").read_text())
    merged = AutoModelForCausalLM.from_pretrained(merged_dir)
    full = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), tmp_path / "adapter")
    ids = torch.tensor([[5, 17, 42, 99, 7]])
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, full(ids).logits, atol=1e-5)
    assert result["model_dir"] == str(merged_dir)
