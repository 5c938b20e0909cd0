"""Every preference loss type at extreme margins, in float32 and bf16, against the same inputs in float64:
finite losses and gradients, and the float64 value to the precision of the dtype (issue 32 item 12:
`discopop` was inf·0 = NaN once β·h < about −88.7)."""

from __future__ import annotations

import pytest
import torch

from alignlab.losses import (
    CPO_LOSS_TYPES,
    LENGTH_NORMALISED_CPO_LOSS_TYPES,
    PAIR_LOSS_TYPES,
    cpo_loss,
    dpo_loss,
    kto_loss,
    orpo_loss,
    simpo_loss,
)

# Summed log-ratio margins from a near tie to far beyond exp's float32 range (e^88.7) at β = 1.
MARGINS = (-3000.0, -1000.0, -300.0, -100.0, -20.0, -1.0, 0.0, 1.0, 20.0, 100.0, 300.0, 1000.0, 3000.0)
# |low − float64| <= atol + rtol·|float64|: float32 keeps about 7 digits, bf16 about 3 (eps 2⁻⁸), and a
# loss that sums or subtracts a few rounded terms loses a few of those.
TOLERANCES = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (3e-2, 3e-2)}


def dpo(loss_type):
    def loss(pc, pr, rc, rr, beta):
        lengths = torch.full_like(pc, 7.0)
        eps = 0.1 if loss_type in ("sigmoid", "robust", "exo_pair", "aot", "aot_unpaired") else 0.0
        return dpo_loss(
            pc, pr, rc, rr, beta=beta, loss_type=loss_type, label_smoothing=eps,
            chosen_lengths=lengths, rejected_lengths=lengths,
        ).losses  # fmt: skip

    return loss


def kto(loss_type):
    def loss(pc, pr, rc, rr, beta):
        logps, ref = torch.cat([pc, pr]), torch.cat([rc, rr])
        desirable = torch.arange(len(logps)) < len(pc)
        return kto_loss(logps, ref, desirable, (pr - rr).mean(), beta=beta, loss_type=loss_type).losses

    return loss


def cpo(loss_type):
    # AlphaPO's e^(−α·log p) stays within every dtype for α·|log p| < 88: α = 0.25 on average log-probs.
    alpha = 0.25 if loss_type == "alphapo" else 0.0
    return lambda pc, pr, rc, rr, beta: cpo_loss(pc, pr, beta=beta, loss_type=loss_type, alpha=alpha).losses


# name: (loss on policy/reference log-probs, whether it reads average per-token log-probs, not sums)
LOSSES = {
    **{f"dpo:{lt}": (dpo(lt), False) for lt in PAIR_LOSS_TYPES},
    **{f"kto:{lt}": (kto(lt), False) for lt in ("kto", "apo_zero_unpaired")},
    **{f"cpo:{lt}": (cpo(lt), lt in LENGTH_NORMALISED_CPO_LOSS_TYPES) for lt in CPO_LOSS_TYPES},
    "simpo": (lambda pc, pr, rc, rr, beta: simpo_loss(pc, pr, beta=beta).losses, True),
    "orpo": (lambda pc, pr, rc, rr, beta: orpo_loss(pc, pr, beta=beta).losses, True),
}


def logps(dtype, average):
    """Policy and reference log-probs (all < 0) whose log-ratio margin runs over MARGINS (over 100 for
    average per-token log-probs), rounded to dtype."""
    margins = torch.tensor(MARGINS, dtype=torch.float64)
    pc = -4000.0 + margins.clamp(min=0)
    pr = -4000.0 - margins.clamp(max=0)
    rc, rr = torch.full_like(pc, -4000.0), torch.full_like(pc, -4000.0)
    return [(x / 100 if average else x).to(dtype) for x in (pc, pr, rc, rr)]


@pytest.mark.parametrize("name", list(LOSSES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("beta", [0.1, 1.0])
def test_loss_at_extreme_margins_matches_float64(name, dtype, beta):
    loss_fn, average = LOSSES[name]
    low = [x.requires_grad_() for x in logps(dtype, average)]
    loss = loss_fn(*low, beta)
    loss.sum().backward()
    high = [x.detach().double().requires_grad_() for x in low]  # the same rounded inputs, in float64
    expected = loss_fn(*high, beta)
    expected.sum().backward()
    assert torch.isfinite(expected).all()
    assert torch.isfinite(loss).all(), f"{name} {dtype}: {loss.tolist()}"
    rtol, atol = TOLERANCES[dtype]
    assert torch.allclose(loss.double(), expected, rtol=rtol, atol=atol), (loss.tolist(), expected.tolist())
    for x, y in zip(low, high):
        if x.grad is None:  # a reference-free loss
            continue
        assert torch.isfinite(x.grad).all(), f"{name} {dtype}: gradient {x.grad.tolist()}"
        # Gradients norm-wise: where σ(−βh) is e^(−βh), its relative error is βh times the margin's, which is
        # the function's own conditioning, not the formula's.
        error = (x.grad.double() - y.grad).abs().max()
        assert error <= atol + rtol * y.grad.abs().max(), (x.grad.tolist(), y.grad.tolist())
