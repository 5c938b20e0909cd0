"""DPO and NLL losses against float64 references written from the papers' formulas."""

from __future__ import annotations

import math

import pytest
import torch

from alignlab.errors import ConfigError
from alignlab.losses import dpo_loss, nll_loss

# The first four; the others are tested in test_dpo_variants.py.
ORIGINAL_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "robust")


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def reference_dpo(pc, pr, rc, rr, beta, loss_type, eps):
    """One pair, scalar float64 math, straight from the papers."""
    h = (pc - rc) - (pr - rr)
    if loss_type == "sigmoid":  # DPO eq. 7; cDPO mixes in the flipped label with weight eps
        return -(1 - eps) * log_sigmoid(beta * h) - eps * log_sigmoid(-beta * h)
    if loss_type == "hinge":  # SLiC-HF: max(0, delta - beta*h), delta = 1
        return max(0.0, 1 - beta * h)
    if loss_type == "ipo":  # IPO eq. 17: (h - 1/(2 tau))^2
        return (h - 1 / (2 * beta)) ** 2
    if loss_type == "robust":  # rDPO eq. 9: unbiased loss under label-flip rate eps
        return ((1 - eps) * -log_sigmoid(beta * h) - eps * -log_sigmoid(-beta * h)) / (1 - 2 * eps)
    raise AssertionError(loss_type)


def t(*xs):
    return torch.tensor(xs, dtype=torch.float64)


def test_sigmoid_hand_checked():
    # h = (-1 - -2) - (-3 - -2) = 1 - (-1) = 2; beta = 0.5 -> beta*h = 1; -log sigma(1) = log(1 + e^-1)
    out = dpo_loss(t(-1.0), t(-3.0), t(-2.0), t(-2.0), beta=0.5)
    assert out.losses.item() == pytest.approx(math.log(1 + math.exp(-1)), abs=1e-12)
    assert out.losses.item() == pytest.approx(0.31326168751822286, abs=1e-12)
    assert out.chosen_rewards.item() == pytest.approx(0.5)  # 0.5 * (-1 - -2)
    assert out.rejected_rewards.item() == pytest.approx(-0.5)  # 0.5 * (-3 - -2)


def test_equal_policy_and_reference_gives_log2():
    out = dpo_loss(t(-4.0, -1.0), t(-2.0, -7.0), t(-4.0, -1.0), t(-2.0, -7.0), beta=0.1)
    assert torch.allclose(out.losses, torch.full((2,), math.log(2), dtype=torch.float64))


def test_hinge_ipo_robust_hand_checked():
    args = (t(-1.0), t(-3.0), t(-2.0), t(-2.0))  # h = 2
    assert dpo_loss(*args, beta=0.25, loss_type="hinge").losses.item() == pytest.approx(0.5)  # 1 - 0.25*2
    assert dpo_loss(*args, beta=0.2, loss_type="hinge").losses.item() == pytest.approx(0.6)
    assert dpo_loss(*args, beta=1.0, loss_type="hinge").losses.item() == 0.0
    assert dpo_loss(*args, beta=0.5, loss_type="ipo").losses.item() == pytest.approx(1.0)  # (2 - 1)^2
    assert dpo_loss(*args, beta=0.25, loss_type="ipo").losses.item() == pytest.approx(0.0)  # (2 - 2)^2
    # robust with eps=0.25: [0.75*log(1+e^-1) - 0.25*log(1+e)] / 0.5
    expected = (0.75 * math.log(1 + math.exp(-1)) - 0.25 * math.log(1 + math.e)) / 0.5
    assert dpo_loss(*args, beta=0.5, loss_type="robust", label_smoothing=0.25).losses.item() == pytest.approx(expected)


@pytest.mark.parametrize("loss_type", ORIGINAL_LOSS_TYPES)
@pytest.mark.parametrize("beta", [0.01, 0.1, 0.5, 2.0])
@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3])
def test_random_batches_match_reference(loss_type, beta, eps):
    g = torch.Generator().manual_seed(ORIGINAL_LOSS_TYPES.index(loss_type) * 1000 + int(beta * 100) + int(eps * 10))
    pc, pr, rc, rr = (-torch.rand(64, generator=g, dtype=torch.float64) * 40 for _ in range(4))
    out = dpo_loss(pc, pr, rc, rr, beta=beta, loss_type=loss_type, label_smoothing=eps)
    expected = [reference_dpo(*map(float, row), beta, loss_type, eps) for row in zip(pc, pr, rc, rr)]
    assert torch.allclose(out.losses, torch.tensor(expected, dtype=torch.float64), rtol=1e-10, atol=1e-12)
    assert torch.allclose(out.chosen_rewards, beta * (pc - rc))
    assert torch.allclose(out.rejected_rewards, beta * (pr - rr))


def test_label_smoothing_zero_robust_equals_sigmoid():
    g = torch.Generator().manual_seed(0)
    args = [-torch.rand(16, generator=g, dtype=torch.float64) * 10 for _ in range(4)]
    assert torch.allclose(dpo_loss(*args, loss_type="robust").losses, dpo_loss(*args, loss_type="sigmoid").losses)


def test_rewards_are_detached_and_loss_has_gradient():
    pc = torch.tensor([-1.0, -2.0], dtype=torch.float64, requires_grad=True)
    out = dpo_loss(pc, t(-3.0, -1.0), t(-2.0, -2.0), t(-2.0, -2.0))
    assert not out.chosen_rewards.requires_grad
    out.losses.sum().backward()
    # d/dpc of -log sigma(beta*h) = -beta * sigma(-beta*h)
    h = torch.tensor([2.0, -1.0], dtype=torch.float64)
    assert torch.allclose(pc.grad, -0.1 * torch.sigmoid(-0.1 * h))


def test_unknown_loss_type_is_an_error():
    with pytest.raises(ConfigError, match=r"unknown DPO loss type 'nope'; one of \('sigmoid', "):
        dpo_loss(t(0.0), t(0.0), t(0.0), t(0.0), loss_type="nope")


def test_nll_is_token_weighted_mean():
    token_logps = t(-1.0, -2.0, 0.0, -4.0).reshape(2, 2)
    mask = t(1.0, 1.0, 0.0, 1.0).reshape(2, 2)
    assert nll_loss(token_logps, mask).item() == pytest.approx((1 + 2 + 4) / 3)
