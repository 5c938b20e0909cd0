"""Answer log-probabilities from a causal LM: the one place every algorithm gets them from."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class AnswerLogps:
    """Per-sequence statistics over the answer tokens of a batch of N sequences."""

    logps: torch.Tensor  # [N] sum of log π(y_t | x, y_<t) over answer tokens
    num_tokens: torch.Tensor  # [N] answer tokens per sequence
    token_logps: torch.Tensor  # [N, T-1] per-token log-probs, 0 outside the answer
    mask: torch.Tensor  # [N, T-1] 1 where the predicted token is an answer token
    mean_logits: torch.Tensor  # [N] mean logit over answer positions and vocabulary (detached)
    token_entropy: torch.Tensor | None = None  # [N, T-1] entropy of each answer position (detached), on request

    @property
    def avg_logps(self) -> torch.Tensor:
        """Length-normalised log-prob: sum / number of answer tokens."""
        return self.logps / self.num_tokens.clamp(min=1)

    def rows(self, sl: slice) -> AnswerLogps:
        """The statistics of a slice of the sequences (e.g. the chosen half of a pairwise batch)."""
        return AnswerLogps(
            self.logps[sl], self.num_tokens[sl], self.token_logps[sl], self.mask[sl], self.mean_logits[sl]
        )

    def split_pairs(self, n_pairs: int) -> tuple[AnswerLogps, AnswerLogps]:
        """(chosen, rejected) halves of a pairwise batch laid out as B chosen then B rejected."""
        return self.rows(slice(0, n_pairs)), self.rows(slice(n_pairs, 2 * n_pairs))


def selective_log_softmax(logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """log_softmax(logits)[..., index] without materialising the full log-softmax tensor."""
    if logits.dtype in (torch.float16, torch.bfloat16):  # log-probs in half precision lose the tails
        logits = logits.float()
    return torch.gather(logits, -1, index.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def answer_logprobs(model, batch: dict, temperature: float = 1.0, entropy: bool = False) -> AnswerLogps:
    """Forward `batch` (input_ids, attention_mask, loss_mask) and score its answer tokens.

    Position t's logits predict token t+1, so logits are shifted left against the labels. Online
    algorithms score sampled answers under the sampling distribution: logits / temperature.
    """
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    logits = logits[:, :-1]
    if temperature != 1.0:
        logits = logits / temperature
    labels = batch["input_ids"][:, 1:]
    mask = batch["loss_mask"][:, 1:].to(logits.dtype)
    token_logps = selective_log_softmax(logits, labels) * mask
    num_tokens = mask.sum(-1)
    token_entropy = None
    with torch.no_grad():
        mean_logits = (logits.float().mean(-1) * mask).sum(-1) / num_tokens.clamp(min=1)
        if entropy:
            logp = torch.log_softmax(logits.float(), -1)
            token_entropy = -(logp.exp() * logp).sum(-1) * mask
    return AnswerLogps(token_logps.sum(-1), num_tokens, token_logps, mask, mean_logits, token_entropy)
