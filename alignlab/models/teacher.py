"""A frozen teacher for distillation (GKD). Whether it shares the student's tokenizer and logit width is
checked before it loads (alignlab.models.compatible.check_same_tokenizer)."""

from __future__ import annotations

import torch

from alignlab.models.reference import Frozen


def load_teacher(folder: str, dtype: torch.dtype, trust_remote_code: bool = False) -> Frozen:
    """The causal LM in `folder`, in `dtype`, frozen (eval mode, no gradients) and kept outside the
    LightningModule's tree (alignlab.models.reference.Frozen). Raises what from_pretrained raises."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        folder, dtype=dtype, trust_remote_code=trust_remote_code, use_safetensors=True
    )
    return Frozen(model)
