"""Supervised fine-tuning: maximise the likelihood of the answer given the prompt."""

from __future__ import annotations

import torch

from alignlab.algorithms.base import AlignmentModule
from alignlab.logprobs import answer_logprobs
from alignlab.losses import nll_loss


class SFT(AlignmentModule):
    """loss = mean NLL over the optimizer step's answer tokens. Metrics: loss, mean_token_accuracy, num_tokens."""

    def compute(self, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        out = answer_logprobs(self.model, batch)
        loss = nll_loss(out.token_logps, out.mask, *self.step_count(batch, "completion_tokens"))
        with torch.no_grad():
            # A token is "right" when the model gives it probability > 0.5 (so it is the argmax).
            right = ((out.token_logps > torch.log(torch.tensor(0.5))) * out.mask).sum() / out.mask.sum()
        return loss, {"mean_token_accuracy": right, "num_tokens": out.num_tokens.sum()}
