"""The frozen reference policy that preference losses measure against."""

from __future__ import annotations

import copy

import torch

from alignlab.models.loading import is_peft
from alignlab.models.logprobs import AnswerLogps, answer_logprobs
from alignlab.models.modes import evaluating


class ReferenceModel:
    """The starting policy, frozen: a copy of it, or (with LoRA) the policy with its adapter disabled.

    With LoRA the base weights never change, so disabling the adapter gives the starting policy
    without holding a second copy in memory. Kept out of the LightningModule's module tree so
    checkpoints and the optimizer never see it.
    """

    def __init__(self, policy: torch.nn.Module, model: torch.nn.Module | None = None):
        self.policy = policy
        if model is not None:  # a reference named in the config, not the starting policy
            self.copy = model.eval().requires_grad_(False)
        else:
            self.copy = None if is_peft(policy) else copy.deepcopy(policy).eval().requires_grad_(False)

    @classmethod
    def of(cls, policy: torch.nn.Module, folder: str | None = None) -> ReferenceModel:
        """The one factory every algorithm builds its reference with: the causal LM in `folder` (in the
        policy's dtype), or the starting policy when `folder` is None (or empty). Raises OSError when
        `folder` holds no model."""
        if not folder:
            return cls(policy)
        from transformers import AutoModelForCausalLM

        dtype = next(policy.parameters()).dtype
        return cls(policy, AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, use_safetensors=True))

    def to(self, device: torch.device) -> ReferenceModel:
        if self.copy is not None:
            self.copy.to(device)
        return self

    @torch.no_grad()
    def answer_logprobs(self, batch: dict, temperature: float = 1.0) -> AnswerLogps:
        if self.copy is not None:
            return answer_logprobs(self.copy, batch, temperature)
        # The policy trains in training mode: its starting self is read without dropout, like a copy.
        with self.policy.disable_adapter(), evaluating(self.policy):
            return answer_logprobs(self.policy, batch, temperature)


class Frozen:
    """A model used without gradients and kept outside the LightningModule's tree, so it is neither
    optimised nor checkpointed (e.g. PPO's reward model); `to()` moves it with the module."""

    def __init__(self, module: torch.nn.Module):
        self.module = module.eval().requires_grad_(False)

    def to(self, device: torch.device) -> Frozen:
        self.module.to(device)
        return self

    @torch.no_grad()
    def __call__(self, *args, **kwargs):
        return self.module(*args, **kwargs)
