"""CPO, SimPO, ORPO and KTO losses against float64 references written from the papers' formulas."""

from __future__ import annotations

import math

import pytest
import torch

from alignlab.losses import cpo_loss, kto_kl_estimate, kto_loss, kto_weight_advice, log1mexp, orpo_loss, simpo_loss


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def t(*xs):
    return torch.tensor(xs, dtype=torch.float64)


def rand(n, lo, hi, seed):
    g = torch.Generator().manual_seed(seed)
    return lo + (hi - lo) * torch.rand(n, generator=g, dtype=torch.float64)


# -- CPO ------------------------------------------------------------------------------------------
def test_cpo_hand_checked():
    # beta*(logp_w - logp_l) = 0.5 * (-2 - -4) = 1 -> loss = log(1 + e^-1)
    out = cpo_loss(t(-2.0), t(-4.0), beta=0.5)
    assert out.losses.item() == pytest.approx(math.log(1 + math.exp(-1)), abs=1e-12)
    assert (out.chosen_rewards.item(), out.rejected_rewards.item()) == (-1.0, -2.0)


@pytest.mark.parametrize("beta", [0.01, 0.1, 1.0])
def test_cpo_random_batches(beta):
    w, lose = rand(64, -60, 0, 1), rand(64, -60, 0, 2)
    expected = t(*[-log_sigmoid(beta * (a - b)) for a, b in zip(w.tolist(), lose.tolist())])
    assert torch.allclose(cpo_loss(w, lose, beta).losses, expected, rtol=1e-12)


# -- SimPO ----------------------------------------------------------------------------------------
def test_simpo_hand_checked():
    # beta*(avg_w - avg_l) - gamma = 2*(-0.5 - -1.5) - 1 = 1 -> log(1 + e^-1)
    out = simpo_loss(t(-0.5), t(-1.5), beta=2.0, gamma=1.0)
    assert out.losses.item() == pytest.approx(math.log(1 + math.exp(-1)), abs=1e-12)
    assert (out.chosen_rewards.item(), out.rejected_rewards.item()) == (-1.0, -3.0)
    # equal answers: the margin gamma alone -> -log sigma(-gamma)
    assert simpo_loss(t(-1.0), t(-1.0), beta=2.0, gamma=1.0).losses.item() == pytest.approx(-log_sigmoid(-1.0))


@pytest.mark.parametrize(("beta", "gamma"), [(2.0, 1.0), (2.5, 0.0), (10.0, 3.0), (0.5, 0.5)])
def test_simpo_random_batches(beta, gamma):
    w, lose = rand(64, -5, 0, 3), rand(64, -5, 0, 4)
    expected = t(*[-log_sigmoid(beta * a - beta * b - gamma) for a, b in zip(w.tolist(), lose.tolist())])
    assert torch.allclose(simpo_loss(w, lose, beta, gamma).losses, expected, rtol=1e-12)


# -- ORPO -----------------------------------------------------------------------------------------
def reference_orpo(avg_w: float, avg_l: float, lam: float) -> float:
    """λ·(−log σ(log odds(y_w) − log odds(y_l))), odds(y) = p/(1−p), p = exp(avg log-prob)."""
    pw, pl = math.exp(avg_w), math.exp(avg_l)
    log_odds = math.log(pw / (1 - pw)) - math.log(pl / (1 - pl))
    return -lam * log_sigmoid(log_odds)


def test_orpo_hand_checked():
    # p_w = 0.5 -> odds 1; p_l = 0.25 -> odds 1/3; log odds ratio = log 3; loss = λ·log(1 + 1/3)
    out = orpo_loss(t(math.log(0.5)), t(math.log(0.25)), beta=0.1)
    assert out.log_odds_chosen.item() == pytest.approx(math.log(3))
    assert out.losses.item() == pytest.approx(0.1 * math.log(4 / 3))
    assert out.log_odds_ratio.item() == pytest.approx(math.log(3 / 4))


@pytest.mark.parametrize("lam", [0.1, 0.5, 1.0])
def test_orpo_random_batches(lam):
    w, lose = rand(64, -8, -0.01, 5), rand(64, -8, -0.01, 6)
    expected = t(*[reference_orpo(a, b, lam) for a, b in zip(w.tolist(), lose.tolist())])
    assert torch.allclose(orpo_loss(w, lose, lam).losses, expected, rtol=1e-9)


def test_log1mexp_is_accurate_near_zero_and_far_below():
    # near 0: 1 - e^x = -x(1 + x/2 + ...), so log(1 - e^x) ≈ log(-x) + x/2; naive log(1 - exp(x)) loses all digits
    for x in (-1e-12, -1e-8, -1e-4):
        assert log1mexp(t(x)).item() == pytest.approx(math.log(-math.expm1(x)), rel=1e-12)
        assert log1mexp(t(x)).item() == pytest.approx(math.log(-x) + x / 2, rel=1e-6)
    for x in (-0.5, -math.log(2), -1.0, -30.0, -800.0):
        assert log1mexp(t(x)).item() == pytest.approx(math.log1p(-math.exp(x)), rel=1e-12, abs=1e-300)
    assert log1mexp(torch.tensor([-1e-6], dtype=torch.float32)).isfinite().all()


def test_orpo_stays_finite_with_log_probs_near_zero():
    w = t(-1e-9, -1e-6, -1e-3)
    out = orpo_loss(w, t(-2.0, -2.0, -2.0), beta=0.1)
    assert torch.isfinite(out.losses).all()
    expected = t(*[reference_orpo(a, -2.0, 0.1) for a in (-1e-9, -1e-6, -1e-3)])
    # the reference is exact here: p/(1-p) at p = e^-1e-9 is huge but representable
    assert torch.allclose(out.losses, expected, rtol=1e-6, atol=1e-15)
    g = w.clone().requires_grad_(True)
    orpo_loss(g, t(-2.0, -2.0, -2.0), beta=0.1).losses.sum().backward()
    assert torch.isfinite(g.grad).all()


# -- KTO ------------------------------------------------------------------------------------------
def reference_kto(r: float, desirable: bool, z0: float, beta: float, lam_d: float, lam_u: float) -> float:
    z0 = max(z0, 0.0)
    if desirable:
        return lam_d * (1 - sigmoid(beta * (r - z0)))
    return lam_u * (1 - sigmoid(beta * (z0 - r)))


def test_kto_hand_checked():
    # r = -1 - -3 = 2, z0 = 0 (from a negative estimate, clamped), beta = 0.5 -> 1 - σ(1)
    policy, ref, lab = t(-1.0, -1.0), t(-3.0, -3.0), torch.tensor([True, False])
    out = kto_loss(policy, ref, lab, kl=t(-0.7), beta=0.5, desirable_weight=2.0, undesirable_weight=3.0)
    assert out.losses[0].item() == pytest.approx(2.0 * (1 - sigmoid(1.0)))
    assert out.losses[1].item() == pytest.approx(3.0 * (1 - sigmoid(-1.0)))
    assert out.rewards.tolist() == [1.0, 1.0]
    # with z0 = 2 the desirable row's value sits at σ(0) = 1/2
    assert kto_loss(policy, ref, lab, kl=t(2.0), beta=0.5).losses.tolist() == pytest.approx([0.5, 0.5])


@pytest.mark.parametrize("desirable_share", [0.0, 0.3, 1.0])  # all-undesirable, mixed, all-desirable
@pytest.mark.parametrize("n", [1, 7, 64])
def test_kto_random_batches(desirable_share, n):
    policy, ref = rand(n, -40, 0, n), rand(n, -40, 0, n + 1)
    labels = torch.arange(n) < round(desirable_share * n)
    for kl in (-1.0, 0.0, 0.8):
        out = kto_loss(policy, ref, labels, t(kl), beta=0.1, desirable_weight=1.3, undesirable_weight=0.7)
        expected = [
            reference_kto(p - r, d, kl, 0.1, 1.3, 0.7)
            for p, r, d in zip(policy.tolist(), ref.tolist(), labels.tolist())
        ]
        assert torch.allclose(out.losses, t(*expected), rtol=1e-12)


def test_kto_reference_point_is_detached_and_clamped():
    policy_kl = t(-1.0, -2.0).requires_grad_(True)
    kl = kto_kl_estimate(policy_kl, t(-1.5, -1.5))  # mean(0.5, -0.5) = 0
    assert kl.item() == 0.0 and not kl.requires_grad
    assert kto_kl_estimate(t(-3.0), t(-1.0)).item() == -2.0  # clamping happens after averaging devices
    policy = t(-1.0).requires_grad_(True)
    kto_loss(policy, t(-1.0), torch.tensor([True]), t(0.5), beta=1.0).losses.sum().backward()
    assert policy.grad.item() == pytest.approx(-sigmoid(-0.5) * sigmoid(0.5))  # d/dr [1 − σ(r − z0)]


def test_kto_weight_advice():
    assert kto_weight_advice(100, 100, 1.0, 1.0) is None  # ratio 1
    assert kto_weight_advice(130, 100, 1.0, 1.0) is None  # 1.3, inside [1, 4/3]
    advice = kto_weight_advice(900, 100, 1.0, 1.0)
    assert "= 9" in advice and "900" in advice and "100" in advice and "algorithm.desirable_weight=0.13" in advice
    low = kto_weight_advice(100, 400, 1.0, 1.0)  # 0.25 < 1
    assert "0.25" in low and "algorithm.desirable_weight=4.667" in low
    assert kto_weight_advice(100, 400, 4.667, 1.0) is None
    assert "needs both" in kto_weight_advice(10, 0, 1.0, 1.0)


def test_orpo_gradient_is_finite_when_the_chosen_answer_is_almost_certain():
    # float32 log-probs within 3e-8 of 0 made exp(x) round to 1 in the unused branch of log1mexp
    x = torch.tensor([-1e-8, 0.0, -0.5], requires_grad=True)
    loss = orpo_loss(x, torch.tensor([-2.0, -2.0, -1.0]), beta=0.1).losses.sum()
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()
