"""Answer log-probabilities from a causal LM: the one place every algorithm gets them from."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint


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


# Answer positions per output-layer call. Logits exist for one chunk at a time (and are recomputed in
# the backward pass rather than kept): with a 150k-token vocabulary, 1024 positions are 0.6 GB in
# float32, where a whole batch's logits would be many GB. 0: every answer position at once.
CHUNK_SIZE = 1024


def _score_chunk(hidden: torch.Tensor, targets: torch.Tensor, head: torch.nn.Module, temperature: float, entropy: bool):
    """(log-prob of each target, mean logit, entropy or None) for hidden states [K, H]."""
    logits = head(hidden)
    if logits.dtype in (torch.float16, torch.bfloat16):  # log-probs in half precision lose the tails
        logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    logps = selective_log_softmax(logits, targets)
    with torch.no_grad():
        mean_logit = logits.mean(-1)
        ent = None
        if entropy:
            logp = torch.log_softmax(logits, -1)
            ent = -(logp.exp() * logp).sum(-1)
    return logps, mean_logit, ent


def answer_logprobs(
    model, batch: dict, temperature: float = 1.0, entropy: bool = False, chunk_size: int = CHUNK_SIZE
) -> AnswerLogps:
    """Forward `batch` (input_ids, attention_mask, loss_mask) and score its answer tokens.

    Position t predicts token t+1. The decoder runs over the whole batch, but the output layer only
    at answer positions, `chunk_size` of them at a time, each chunk's logits recomputed in the backward
    pass instead of stored: no full-vocabulary logits for the batch ever exist. Online algorithms score
    sampled answers under the sampling distribution: logits / temperature.
    """
    hidden = model.get_decoder()(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
    ).last_hidden_state[:, :-1]
    head = model.get_output_embeddings()
    mask = batch["loss_mask"][:, 1:]
    rows, cols = mask.nonzero(as_tuple=True)  # answer positions, row by row
    states, targets = hidden[rows, cols], batch["input_ids"][:, 1:][rows, cols]
    step = chunk_size if chunk_size > 0 else max(len(targets), 1)
    pieces = []
    for start in range(0, len(targets), step):
        args = (states[start : start + step], targets[start : start + step], head, temperature, entropy)
        if torch.is_grad_enabled() and states.requires_grad:
            pieces.append(checkpoint(_score_chunk, *args, use_reentrant=False))
        else:
            pieces.append(_score_chunk(*args))
    dtype = torch.float32 if hidden.dtype in (torch.float16, torch.bfloat16) else hidden.dtype
    logps = torch.cat([p[0] for p in pieces]) if pieces else hidden.new_zeros(0, dtype=dtype)
    token_logps = torch.zeros(mask.shape, dtype=logps.dtype, device=logps.device).index_put((rows, cols), logps)
    mask = mask.to(logps.dtype)
    num_tokens = mask.sum(-1)
    with torch.no_grad():
        mean_logit = torch.cat([p[1] for p in pieces]) if pieces else logps.detach()
        mean_logits = torch.zeros_like(num_tokens).index_add(0, rows, mean_logit) / num_tokens.clamp(min=1)
        token_entropy = None
        if entropy:
            values = torch.cat([p[2] for p in pieces]) if pieces else logps.detach()
            token_entropy = torch.zeros_like(token_logps).index_put((rows, cols), values)
    return AnswerLogps(token_logps.sum(-1), num_tokens, token_logps, mask, mean_logits, token_entropy)
