"""SFT's mean_token_accuracy is TRL's: the share of answer tokens that are the argmax of the logits."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import build_module


def test_mean_token_accuracy_counts_the_answer_tokens_that_are_the_argmax(tiny):
    """Row 0's answer is the model's greedy continuation (every token the argmax, yet mostly with
    probability < 0.5 for an untrained model), rows 1-2 are random: the metric equals the argmax
    count from the model's own logits."""
    model, tokenizer = tiny
    module = build_module("sft", model, tokenizer)
    ids = torch.randint(3, 200, (3, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for t in range(4, 12):
            ids[0, t] = model(ids[:1, :t]).logits[0, -1].argmax()
        loss_mask = torch.zeros_like(ids)
        loss_mask[:, 4:] = 1
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "loss_mask": loss_mask}
        _, metrics = module.compute({**batch, "index": torch.arange(3)})
        logits = model(ids).logits[:, :-1]
    scored = loss_mask[:, 1:].bool()
    right = (logits.argmax(-1) == ids[:, 1:]) & scored
    probable = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None])[..., 0] > torch.log(torch.tensor(0.5))
    assert right[0, 3:].all() and (probable & scored).sum() < right.sum()  # a p > 0.5 rule would count fewer
    assert metrics["mean_token_accuracy"].item() == pytest.approx((right.sum() / scored.sum()).item(), abs=1e-7)
