"""GKD's generalised Jensen–Shannon divergence (Agarwal et al., 2024, eq. 1) against float64 references
written from the paper's formula, on hand-checkable and random distributions, and against TRL's
`GKDTrainer.generalized_jsd_loss` on the same tensors (skipped when TRL is absent)."""

from __future__ import annotations

import math

import pytest
import torch

from alignlab.losses.gkd import generalized_jsd, gkd_loss


def logits_of(*probs: float) -> torch.Tensor:
    """Logits whose softmax is `probs` (log-probabilities are logits)."""
    return torch.tensor([math.log(p) for p in probs], dtype=torch.float64)


def kl(p: list[float], q: list[float]) -> float:
    return sum(a * math.log(a / b) for a, b in zip(p, q) if a > 0)


def jsd_reference(p: list[float], q: list[float], beta: float) -> float:
    """The paper's JSD(β)(P ‖ Q), teacher P, student Q, M = βP + (1 − β)Q; TRL's ends: β = 0 is
    KL(P ‖ Q), β = 1 is KL(Q ‖ P)."""
    if beta == 0:
        return kl(p, q)
    if beta == 1:
        return kl(q, p)
    m = [beta * a + (1 - beta) * b for a, b in zip(p, q)]
    return beta * kl(p, m) + (1 - beta) * kl(q, m)


TEACHER, STUDENT = [0.8, 0.2], [0.5, 0.5]


def test_beta_0_is_the_forward_kl_teacher_to_student():
    # KL(P ‖ Q) = 0.8 ln(0.8/0.5) + 0.2 ln(0.2/0.5) = 0.19274...
    expected = 0.8 * math.log(1.6) + 0.2 * math.log(0.4)
    assert expected == pytest.approx(0.1927448, abs=1e-7)
    value = generalized_jsd(logits_of(*STUDENT), logits_of(*TEACHER), beta=0.0)
    assert value.item() == pytest.approx(expected, abs=1e-12)


def test_beta_1_is_the_reverse_kl_student_to_teacher():
    # KL(Q ‖ P) = 0.5 ln(0.5/0.8) + 0.5 ln(0.5/0.2) = 0.22314...
    expected = 0.5 * math.log(0.5 / 0.8) + 0.5 * math.log(0.5 / 0.2)
    assert expected == pytest.approx(0.2231436, abs=1e-7)
    value = generalized_jsd(logits_of(*STUDENT), logits_of(*TEACHER), beta=1.0)
    assert value.item() == pytest.approx(expected, abs=1e-12)


def test_beta_half_is_the_jensen_shannon_divergence():
    # M = (0.65, 0.35); ½ KL(P ‖ M) + ½ KL(Q ‖ M)
    kl_pm = 0.8 * math.log(0.8 / 0.65) + 0.2 * math.log(0.2 / 0.35)
    kl_qm = 0.5 * math.log(0.5 / 0.65) + 0.5 * math.log(0.5 / 0.35)
    expected = 0.5 * kl_pm + 0.5 * kl_qm
    assert expected == pytest.approx(0.0506716, abs=1e-6)
    value = generalized_jsd(logits_of(*STUDENT), logits_of(*TEACHER), beta=0.5)
    assert value.item() == pytest.approx(expected, abs=1e-12)
    # symmetric at β = ½, and at most ln 2 (disjoint supports reach it)
    swapped = generalized_jsd(logits_of(*TEACHER), logits_of(*STUDENT), beta=0.5)
    assert swapped.item() == pytest.approx(expected, abs=1e-12)
    far = generalized_jsd(torch.tensor([60.0, 0.0]).double(), torch.tensor([0.0, 60.0]).double(), beta=0.5)
    assert far.item() == pytest.approx(math.log(2), abs=1e-12)


def test_equal_distributions_give_zero_and_the_interior_vanishes_towards_the_ends():
    same = torch.tensor([[0.3, -1.0, 2.0]], dtype=torch.float64)
    for beta in (0.0, 0.1, 0.5, 0.9, 1.0):
        assert generalized_jsd(same, same.clone(), beta).abs().max().item() < 1e-15
    s, p = logits_of(*STUDENT), logits_of(*TEACHER)
    # JSD(β)/β → KL(P ‖ Q) as β → 0, and JSD(β)/(1 − β) → KL(Q ‖ P) as β → 1: the ends are those limits
    assert (generalized_jsd(s, p, 1e-6) / 1e-6).item() == pytest.approx(kl(TEACHER, STUDENT), rel=1e-5)
    assert (generalized_jsd(s, p, 1 - 1e-6) / 1e-6).item() == pytest.approx(kl(STUDENT, TEACHER), rel=1e-5)


def test_temperature_divides_both_logits():
    s, p = torch.tensor([2.0, 0.0, -1.0]).double(), torch.tensor([0.0, 1.0, 3.0]).double()
    for beta in (0.0, 0.4, 1.0):
        assert generalized_jsd(s, p, beta, temperature=2.0).item() == pytest.approx(
            generalized_jsd(s / 2, p / 2, beta).item(), abs=1e-14
        )


def test_a_zero_probability_token_adds_nothing():
    # the teacher rules out token 2 (logit −inf): p log p = 0 there, not nan
    s = torch.tensor([0.0, 0.0, 0.0], dtype=torch.float64)
    p = torch.tensor([0.0, 0.0, float("-inf")], dtype=torch.float64)
    assert generalized_jsd(s, p, 0.0).item() == pytest.approx(math.log(1.5), abs=1e-12)  # KL((½,½,0) ‖ ⅓s)
    assert math.isfinite(generalized_jsd(s, p, 0.5).item())


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_random_distributions_against_the_formula(beta, temperature):
    g = torch.Generator().manual_seed(int(beta * 10) + int(temperature * 10))
    student = 3 * torch.randn(4, 6, 11, generator=g, dtype=torch.float64)
    teacher = 3 * torch.randn(4, 6, 11, generator=g, dtype=torch.float64)
    values = generalized_jsd(student, teacher, beta, temperature)
    for i in range(4):
        for j in range(6):
            q = torch.softmax(student[i, j] / temperature, -1).tolist()
            p = torch.softmax(teacher[i, j] / temperature, -1).tolist()
            assert values[i, j].item() == pytest.approx(jsd_reference(p, q, beta), rel=1e-10, abs=1e-14)


def test_loss_is_the_masked_token_mean_over_the_step():
    g = torch.Generator().manual_seed(3)
    student = torch.randn(3, 5, 7, generator=g, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(3, 5, 7, generator=g, dtype=torch.float64)
    mask = torch.tensor([[0, 1, 1, 1, 0], [0, 0, 1, 1, 1], [0, 0, 0, 1, 0]])
    out = gkd_loss(student, teacher, 0.5, mask=mask)
    per_token = generalized_jsd(student, teacher, 0.5).detach()
    assert out.loss.item() == pytest.approx((per_token * mask).sum().item() / 7, rel=1e-12)
    # cut in two micro-batches, each over the step's 7 tokens: the same loss and gradient
    whole = torch.autograd.grad(out.loss, student)[0]
    parts = [
        gkd_loss(student[r], teacher[r], 0.5, mask=mask[r], num_items_in_batch=7).loss
        for r in (slice(0, 1), slice(1, 3))
    ]
    assert sum(p.item() for p in parts) == pytest.approx(out.loss.item(), rel=1e-12)
    assert torch.allclose(torch.autograd.grad(sum(parts), student)[0], whole, rtol=1e-12)
    assert (whole[mask == 0] == 0).all()  # positions outside the mask get no gradient


def test_out_of_range_arguments_are_refused():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="beta must be in"):
        generalized_jsd(x, x, 1.5)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        generalized_jsd(x, x, 0.5, temperature=0.0)
    with pytest.raises(ValueError, match="differ in shape"):
        generalized_jsd(x, torch.zeros(2, 4), 0.5)


@pytest.mark.parametrize("beta", [0.0, 0.3, 0.5, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 0.9])
def test_equals_trl_generalized_jsd_loss(beta, temperature, monkeypatch):
    pytest.importorskip("trl")
    monkeypatch.setenv("TRL_EXPERIMENTAL_SILENCE", "1")
    from trl.experimental.gkd import GKDTrainer

    g = torch.Generator().manual_seed(7)
    student = 2 * torch.randn(3, 6, 13, generator=g, dtype=torch.float64)
    teacher = 2 * torch.randn(3, 6, 13, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 13, (3, 6), generator=g)
    labels[0, :2], labels[1, :4], labels[2, 5] = -100, -100, -100  # prompt and padding positions
    trl = GKDTrainer.generalized_jsd_loss(student, teacher, labels, beta=beta, temperature=temperature)
    ours = gkd_loss(student, teacher, beta, temperature, mask=labels != -100).loss
    assert ours.item() == pytest.approx(trl.item(), rel=1e-10)
