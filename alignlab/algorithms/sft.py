"""Supervised fine-tuning: maximise the likelihood of the answer given the prompt."""

from __future__ import annotations

import torch

from alignlab.algorithms.base import AlignmentModule
from alignlab.losses import nll_loss, step_mean
from alignlab.models.logprobs import answer_logprobs


class SFT(AlignmentModule):
    """loss = mean NLL over the optimizer step's answer tokens. Metrics: loss, mean_token_accuracy, num_tokens."""

    step_sums = ("loss", "mean_token_accuracy")  # both token means over the step

    def compute(self, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        out = answer_logprobs(self.model, batch)
        count = self.step_count(batch, "completion_tokens")
        loss = nll_loss(out.token_logps, out.mask, *count)
        with torch.no_grad():
            # A token is right when it is the argmax of the logits, as TRL's mean_token_accuracy counts it.
            right = step_mean(out.token_argmax, out.mask, *count)
            tokens = out.num_tokens.sum() if count[0] is None else out.mask.new_tensor(float(count[0]))
        return loss, {"mean_token_accuracy": right, "num_tokens": tokens}
