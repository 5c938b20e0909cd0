"""Generalised Jensen–Shannon divergence between a student's and a teacher's next-token distributions,
the loss of on-policy distillation (GKD: Agarwal et al., 2024, "On-Policy Distillation of Language
Models: Learning from Self-Generated Mistakes", arXiv:2306.13649, eq. 1 and §3).

With P the teacher's and Q the student's distribution over the vocabulary at one answer position,

    JSD(β)(P ‖ Q) = β · KL(P ‖ M) + (1 − β) · KL(Q ‖ M),   M = β·P + (1 − β)·Q,

summed over the vocabulary, one value per token. Its ends, as TRL's `GKDTrainer.generalized_jsd_loss`
(and TRL's docs) define them, are the two KL divergences themselves:

    β = 0 → KL(P ‖ Q) = Σ_v p_v (log p_v − log q_v), the forward KL (teacher ‖ student; mode covering),
    β = 1 → KL(Q ‖ P) = Σ_v q_v (log q_v − log p_v), the reverse KL (student ‖ teacher; mode seeking).

The formula's own limits there vanish (M becomes Q or P): the ends are the KLs the interpolation
approaches once divided by β (β → 0) or 1 − β (β → 1), so the loss's scale jumps at 0 and 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from alignlab.losses.reduction import step_mean


@dataclass
class GKDLossOutput:
    loss: torch.Tensor  # scalar: the micro-batch's share of the step's mean divergence per token
    token_jsd: torch.Tensor  # [*] each position's divergence (nats), before the mask (detached)


def _kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """Σ_v p_v (log p_v − log q_v) over the last dimension; a token with p_v = 0 adds 0 (even where log q_v
    is −inf too)."""
    p = log_p.exp()
    return torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p)).sum(-1)


def generalized_jsd(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, beta: float, temperature: float = 1.0
) -> torch.Tensor:
    """JSD(β)(teacher ‖ student) at each position, summed over the vocabulary (see the module docstring).

    Args:
        student_logits, teacher_logits: [..., V] logits over the same vocabulary (the student's carry
            gradients); both are divided by `temperature` before the softmax.
        beta: in [0, 1]; 0 is the forward KL(teacher ‖ student), 1 the reverse KL(student ‖ teacher).
        temperature: > 0.
    Returns:
        [...] divergences in nats, in the student's dtype (float32 for half-precision logits).
    Raises:
        ValueError: beta outside [0, 1], temperature <= 0, or logits of other shapes.
    """
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} differ in shape (a shared vocabulary is needed)"
        )
    dtype = torch.float32 if student_logits.dtype in (torch.float16, torch.bfloat16) else student_logits.dtype
    log_q = torch.log_softmax(student_logits.to(dtype) / temperature, -1)
    log_p = torch.log_softmax(teacher_logits.to(dtype) / temperature, -1)
    if beta == 0.0:
        return _kl(log_p, log_q)
    if beta == 1.0:
        return _kl(log_q, log_p)
    b = torch.tensor(beta, dtype=dtype, device=log_q.device)
    log_m = torch.logaddexp(log_p + torch.log(b), log_q + torch.log1p(-b))
    return beta * _kl(log_p, log_m) + (1.0 - beta) * _kl(log_q, log_m)


def gkd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    beta: float,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
    num_items_in_batch: float | torch.Tensor | None = None,
    scale: float = 1.0,
) -> GKDLossOutput:
    """GKD's loss: the mean of `generalized_jsd` over the answer tokens of the optimizer step.

    Σ_t m_t · JSD(β)_t · scale / num_items_in_batch (alignlab.losses.reduction.step_mean), which is TRL's
    token mean (`reduction="batchmean"` over the tokens its labels keep, or its `num_items_in_batch`).

    Args:
        student_logits, teacher_logits: [..., V], e.g. [N, T, V] or the answer positions alone [K, V].
        beta, temperature: see `generalized_jsd`.
        mask: [...] 1 on the positions that count (answer tokens); None: all of them.
        num_items_in_batch: the step's count of such positions over every micro-batch and process;
            None: this call's own count (its plain mean).
        scale: what the training loop divides the gradient by (see step_mean).
    Returns:
        GKDLossOutput(loss: scalar, token_jsd: [...] detached).
    """
    jsd = generalized_jsd(student_logits, teacher_logits, beta, temperature)
    return GKDLossOutput(step_mean(jsd, mask, num_items_in_batch, scale), jsd.detach())
