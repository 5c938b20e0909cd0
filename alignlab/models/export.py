"""Saving the trained policy in Hugging Face format (safetensors), adapter and/or merged."""

from __future__ import annotations

import copy
from pathlib import Path

from alignlab.models.loading import is_peft
from alignlab.models.vision import is_multimodal


def submodule_state(state_dict: dict | None, prefix: str) -> dict | None:
    """The entries of a module's state dict under `prefix` (e.g. "model."), with the prefix removed."""
    if state_dict is None:
        return None
    return {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}


def save_model(model, tokenizer, run_dir: Path, merge_lora: bool = True, state_dict: dict | None = None) -> Path:
    """Save to <run_dir>/model (and <run_dir>/adapter with LoRA); return the loadable folder.

    Without LoRA, <run>/model holds config.json, *.safetensors and the tokenizer (and a vision-language
    model's image processor). With LoRA the
    adapter always goes to <run>/adapter; <run>/model then holds the merged weights when
    merge_lora, else the adapter too (transformers loads it on top of its base model via PEFT).
    `state_dict`: the model's whole weights when the live model holds only a shard of them (FSDP,
    DeepSpeed ZeRO-3 gather them for process 0); a merged model is then rebuilt from the base model
    and the saved adapter.
    """
    weights = {} if state_dict is None else {"state_dict": state_dict}
    run_dir = Path(run_dir)
    model_dir = run_dir / "model"
    if is_peft(model):
        adapter_dir = run_dir / "adapter"
        model.save_pretrained(adapter_dir, safe_serialization=True, **weights)
        tokenizer.save_pretrained(adapter_dir)
        if not merge_lora:
            model.save_pretrained(model_dir, safe_serialization=True, **weights)
        elif is_quantized(model) or state_dict is not None:  # merge into the base model as loaded from disk
            merged_from_full_precision(model, adapter_dir).save_pretrained(model_dir, safe_serialization=True)
        else:  # merge a copy, so the live (still LoRA-wrapped) module is untouched
            copy.deepcopy(model).merge_and_unload().save_pretrained(model_dir, safe_serialization=True)
    else:
        model.save_pretrained(model_dir, safe_serialization=True, **weights)
    tokenizer.save_pretrained(model_dir)
    for folder in {model_dir, run_dir / "adapter"} if is_peft(model) else {model_dir}:
        save_image_processor(model, folder)
    return model_dir


def save_image_processor(model, folder: Path) -> None:
    """Beside a vision-language model's weights, the image processor of the folder it was loaded from
    (`config._name_or_path`), so that the saved folder loads and processes images as the run did."""
    if not is_multimodal(model):
        return
    from transformers import AutoImageProcessor

    source = (model.get_base_model() if is_peft(model) else model).config._name_or_path
    AutoImageProcessor.from_pretrained(source).save_pretrained(folder)


def is_quantized(model) -> bool:
    return getattr(model.get_base_model(), "hf_quantizer", None) is not None


def merged_from_full_precision(model, adapter_dir: Path):
    """The base model reloaded from its folder (without quantization), with the saved adapter merged in.

    When the run added tokens (an installed chat template), the reloaded base grows to the live
    model's vocabulary first, so the adapter's embedding rows fit, and takes the live generation
    config (which stops at the template's end of turn)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = model.get_base_model()
    if is_quantized(model):
        dtype = base.hf_quantizer.quantization_config.bnb_4bit_compute_dtype
    else:
        dtype = base.dtype
    full = AutoModelForCausalLM.from_pretrained(base.config._name_or_path, dtype=dtype, use_safetensors=True)
    vocab = base.config.get_text_config().vocab_size  # the live vocabulary (PEFT wraps the embedding layer)
    if full.get_input_embeddings().num_embeddings < vocab:
        full.resize_token_embeddings(vocab, mean_resizing=False)  # rows come from the adapter
    full.generation_config = copy.deepcopy(base.generation_config)
    return PeftModel.from_pretrained(full, adapter_dir).merge_and_unload()
