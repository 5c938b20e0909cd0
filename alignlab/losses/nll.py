"""Negative log-likelihood of answer tokens, the SFT objective and DPO's RPO term."""

from __future__ import annotations

import torch


def nll_loss(token_logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean NLL per answer token over the whole batch.

    -Σ_{i,t} m_it · log π(y_it) / Σ_{i,t} m_it, with token_logps and mask both [N, T].
    Token-weighted (not a mean of per-row means), as in standard SFT.
    """
    return -(token_logps * mask).sum() / mask.sum().clamp(min=1)
