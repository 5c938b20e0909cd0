"""Training-mode plumbing for models: turning dropout off, and running a trained model in eval mode
for a while (a frozen pass through the policy itself)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


def disable_dropout(model: torch.nn.Module) -> int:
    """Set every dropout probability in `model` to 0, as TRL's `disable_dropout_in_model` does, and
    more: each `torch.nn.Dropout`'s `p` (GPT-2's attention, residual and embedding dropouts, LoRA's
    `lora_dropout`), and each float attribute with "drop" in its name that a module reads at forward
    time (Llama-family attention's `attention_dropout`, passed to the attention function in training
    mode; `activation_dropout`, `hidden_dropout`, `resid_pdrop`, ...). The model's config is left as it
    is, so an exported model keeps its own values; the few architectures that read a dropout from their
    config at forward time (Persimmon's attention) keep it.

    Returns how many probabilities were above 0 (0 for a model without dropout, e.g. the tiny model).
    """
    zeroed = 0
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            zeroed += module.p > 0
            module.p = 0.0
        for name, value in vars(module).items():
            if "drop" in name and isinstance(value, float) and value > 0:
                setattr(module, name, 0.0)
                zeroed += 1
    return int(zeroed)


@contextlib.contextmanager
def evaluating(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """`model` in eval mode inside the block (no dropout), then back in the mode it was in: for a
    frozen pass through a model that trains, such as the policy with its LoRA adapter disabled."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)
