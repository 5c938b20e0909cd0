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
    def mix_in(self, policy: torch.nn.Module, alpha: float) -> None:
        """TR-DPO's soft update (Gorbatovski et al., 2024; TRL's `sync_ref_model`): every reference weight
        becomes α·θ_policy + (1 − α)·θ_ref, in place (`mixup`), matched by name.

        Raises:
            ValueError: the reference is the policy with its LoRA adapter disabled (no weights of its own to
                move), or the two models' weights do not match by name and shape.
        """
        if self.copy is None:
            raise ValueError(
                "sync_ref_model needs a reference copy: with LoRA the reference is the policy with its adapter "
                "disabled, whose base weights never move"
            )
        ref, new = dict(self.copy.named_parameters()), dict(policy.named_parameters())
        if ref.keys() != new.keys() or any(ref[k].shape != new[k].shape for k in ref):
            raise ValueError("sync_ref_model: the reference's weights do not match the policy's by name and shape")
        for name, weight in ref.items():
            mixup(weight, new[name], alpha)

    @torch.no_grad()
    def answer_logprobs(self, batch: dict, temperature: float = 1.0) -> AnswerLogps:
        if self.copy is not None:
            return answer_logprobs(self.copy, batch, temperature)
        # The policy trains in training mode: its starting self is read without dropout, like a copy.
        with self.policy.disable_adapter(), evaluating(self.policy):
            return answer_logprobs(self.policy, batch, temperature)


@torch.no_grad()
def mixup(reference: torch.Tensor, policy: torch.Tensor, alpha: float) -> torch.Tensor:
    """reference ← α·policy + (1 − α)·reference, in place (TR-DPO, Gorbatovski et al., 2024, eq. 5; TRL's
    `SyncRefModelCallback._sync_target_model`); returns `reference`. `policy` is cast to its dtype/device."""
    return reference.mul_(1.0 - alpha).add_(policy.to(reference), alpha=alpha)


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
