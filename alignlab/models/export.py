"""Saving the trained policy in Hugging Face format (safetensors), adapter and/or merged."""

from __future__ import annotations

import copy
from pathlib import Path

from alignlab.models.loading import is_peft


def save_model(model, tokenizer, run_dir: Path, merge_lora: bool = True) -> Path:
    """Save to <run_dir>/model (and <run_dir>/adapter with LoRA); return the loadable folder.

    Without LoRA, <run>/model holds config.json, *.safetensors and the tokenizer. With LoRA the
    adapter always goes to <run>/adapter; <run>/model then holds the merged weights when
    merge_lora, else the adapter too (transformers loads it on top of its base model via PEFT).
    """
    run_dir = Path(run_dir)
    model_dir = run_dir / "model"
    if is_peft(model):
        adapter_dir = run_dir / "adapter"
        model.save_pretrained(adapter_dir, safe_serialization=True)
        tokenizer.save_pretrained(adapter_dir)
        if not merge_lora:
            model.save_pretrained(model_dir, safe_serialization=True)
        elif is_quantized(model):  # QLoRA: merge into the full-precision base, not into 4-bit weights
            merged_from_full_precision(model, adapter_dir).save_pretrained(model_dir, safe_serialization=True)
        else:  # merge a copy, so the live (still LoRA-wrapped) module is untouched
            copy.deepcopy(model).merge_and_unload().save_pretrained(model_dir, safe_serialization=True)
    else:
        model.save_pretrained(model_dir, safe_serialization=True)
    tokenizer.save_pretrained(model_dir)
    return model_dir


def is_quantized(model) -> bool:
    return getattr(model.get_base_model(), "hf_quantizer", None) is not None


def merged_from_full_precision(model, adapter_dir: Path):
    """The base model reloaded without quantization, with the saved adapter merged into it."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = model.get_base_model()
    dtype = base.hf_quantizer.quantization_config.bnb_4bit_compute_dtype
    full = AutoModelForCausalLM.from_pretrained(base.config._name_or_path, dtype=dtype, use_safetensors=True)
    return PeftModel.from_pretrained(full, adapter_dir).merge_and_unload()
