"""Memory settings change memory, not results: gradient checkpointing gives the same loss and
gradients; QLoRA (4-bit base weights via bitsandbytes, LoRA adapters) trains and exports a
full-precision merged model."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from omegaconf import OmegaConf

from alignlab.models.loading import load_model
from alignlab.models.logprobs import answer_logprobs
from alignlab.runner.config import compose
from tests.conftest import QUIET
from tests.models.test_model_math import pair_batch


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
        with warnings.catch_warnings():
            if not lora:  # no deprecated name (gradient_checkpointing_enable); peft's wrapper still reads one
                warnings.simplefilter("error", FutureWarning)
            model, tokenizer, _ = load_model(
                model_cfg(tiny_model_dir, **{"gradient_checkpointing": checkpointing, "lora.enabled": lora})
            )
        model.train()
        base = model.get_base_model() if lora else model
        new_name = hasattr(type(base), "is_activation_checkpointing")  # transformers ≥ 5.23
        assert (base.is_activation_checkpointing if new_name else base.is_gradient_checkpointing) == checkpointing
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


@pytest.mark.parametrize(("algorithm", "lora"), [("sft", False), ("sft", True), ("rm", False)])
def test_export_from_gathered_weights_equals_export_from_the_live_model(tiny_model_dir, tmp_path, algorithm, lora):
    """Under FSDP or ZeRO-3 the final model is saved from the gathered state dict (process 0), not
    from the live, sharded modules; both ways must write the same files' tensors."""
    from safetensors.torch import load_file

    from tests.conftest import build_module

    model, tokenizer, _ = load_model(model_cfg(tiny_model_dir, **{"lora.enabled": lora}))
    with torch.no_grad():  # move the trained weights (LoRA: only the adapter) away from the start
        generator = torch.Generator().manual_seed(0)
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=generator) * 0.01)
    module = build_module(algorithm, model, tokenizer)
    live = module.save_final(tmp_path / "live", merge_lora=True)
    whole = module.save_final(tmp_path / "whole", merge_lora=True, state_dict=module.state_dict())
    files = sorted(p.relative_to(live.parent) for p in live.parent.rglob("*.safetensors"))
    assert files == sorted(p.relative_to(whole.parent) for p in whole.parent.rglob("*.safetensors"))
    assert len(files) == {("sft", False): 1, ("sft", True): 2, ("rm", False): 2}[(algorithm, lora)]
    for name in files:
        a, b = load_file(live.parent / name), load_file(whole.parent / name)
        assert a.keys() == b.keys()
        for key in a:
            assert torch.allclose(a[key], b[key], atol=1e-6), (name, key)


def test_fsdp_profile_shards_per_transformer_block(tiny):
    """hardware=fsdp builds Lightning's FSDPStrategy whose wrap policy picks the model's own
    transformer blocks (its `_no_split_modules`), visiting parents before children as FSDP does."""
    from hydra.utils import instantiate
    from lightning.pytorch.strategies import FSDPStrategy

    from alignlab.runner.hardware import TransformerBlocks

    strategy = instantiate(compose(["hardware=fsdp"]).trainer.strategy)
    assert isinstance(strategy, FSDPStrategy) and isinstance(strategy.kwargs["auto_wrap_policy"], TransformerBlocks)
    policy, (model, _) = TransformerBlocks(), tiny
    wrapped = [n for n, m in model.named_modules() if policy(m, True, 0) and policy(m, False, 0)]
    assert wrapped == [f"model.layers.{i}" for i in range(model.config.num_hidden_layers)]


def test_profiles_set_what_the_scaling_docs_say():
    ddp = compose(["hardware=ddp"]).trainer
    assert (ddp.accelerator, ddp.devices, ddp.precision) == ("gpu", -1, "bf16-mixed")
    assert ddp.strategy._target_.endswith("DDPStrategy")
    cpu = compose(["hardware=ddp_cpu"]).trainer
    assert (cpu.accelerator, cpu.devices, cpu.strategy.process_group_backend) == ("cpu", 2, "gloo")
    deepspeed = compose(["hardware=deepspeed"]).trainer.strategy
    assert (
        deepspeed.stage == 2 and compose(["hardware=deepspeed", "trainer.strategy.stage=3"]).trainer.strategy.stage == 3
    )


def test_slurm_profile_submits_one_task_per_gpu_on_every_node(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from alignlab.runner.config import CONFIG_DIR

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = hydra_compose("train", ["hardware=slurm", "trainer.num_nodes=4"], return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert (launcher.nodes, launcher.tasks_per_node, launcher.gpus_per_node) == (4, 8, 8)
    assert (cfg.trainer.num_nodes, cfg.trainer.devices, cfg.trainer.strategy) == (4, 8, "ddp")
    assert cfg.resume == "auto"  # a requeued job continues from its checkpoint


def test_deepspeed_without_deepspeed_installed_says_how_to_get_it(monkeypatch):
    import importlib.util

    from alignlab.errors import ConfigError
    from alignlab.runner.config import check_config

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "deepspeed" else real(name, *a))
    with pytest.raises(ConfigError, match="needs DeepSpeed: pip install deepspeed"):
        check_config(compose(["hardware=deepspeed"]))
    with pytest.raises(ConfigError, match=r"trainer.strategy.stage must be one of \(1, 2, 3\), got 4"):
        check_config(compose(["hardware=ddp", "+trainer.strategy.stage=4"]))
