"""The frozen reference policy that preference losses measure against."""

from __future__ import annotations

import copy

import torch

from alignlab.logprobs import AnswerLogps, answer_logprobs
from alignlab.models.loading import is_peft


class ReferenceModel:
    """The starting policy, frozen: a copy of it, or (with LoRA) the policy with its adapter disabled.

    With LoRA the base weights never change, so disabling the adapter gives the starting policy
    without holding a second copy in memory. Kept out of the LightningModule's module tree so
    checkpoints and the optimizer never see it.
    """

    def __init__(self, policy: torch.nn.Module):
        self.policy = policy
        self.copy = None if is_peft(policy) else copy.deepcopy(policy).eval().requires_grad_(False)

    def to(self, device: torch.device) -> ReferenceModel:
        if self.copy is not None:
            self.copy.to(device)
        return self

    @torch.no_grad()
    def answer_logprobs(self, batch: dict) -> AnswerLogps:
        if self.copy is not None:
            return answer_logprobs(self.copy, batch)
        with self.policy.disable_adapter():
            return answer_logprobs(self.policy, batch)
