"""The KL to the reference as a loss term: which KL each form's gradient descends, computed exactly.

On a categorical distribution π = softmax(θ) over 5 tokens (a one-token answer), the expected gradient of a
per-token loss form f over y ~ q is Σ_y q(y)·∇_θ f(y), with the sampling weights q(y) held constant: exactly
what averaging ∇f over sampled tokens estimates. It is compared in float64 with the closed forms

    ∇_θ KL(π ‖ π_ref) = π ⊙ (d − E_π[d]),  d = log π − log π_ref     (the reverse KL: what the value estimates)
    ∇_θ KL(π_ref ‖ π) = π − π_ref                                    (the forward KL)

Plain k3 as a loss descends the forward KL (verl PR 2953; "A Comedy of Estimators", arXiv:2512.21852); k2,
verl's k1+/k3+ (on-policy), TRL's use_bias_correction_kl (ρ·k3, ρ = π/π_old, any π_old) and OpenRLHF's
`unbiased_gradient` (k3's value, ρ-weighted k2 gradient with ρ detached) descend the reverse KL.
"""

from __future__ import annotations

import math

import pytest
import torch

from alignlab.losses.grpo import grpo_loss
from alignlab.losses.rlhf import KL_ESTIMATES, kl_estimate, kl_loss_gradient, kl_loss_term

PI = [0.4, 0.3, 0.1, 0.1, 0.1]  # π; π_ref uniform (0.2 each): the hand-checked case


def expected_gradient(form, logits, ref_logp, sampler_logp=None, old_logp=None) -> torch.Tensor:
    """Σ_y q(y)·∇_θ form(log π(y), log π_ref(y), log π_old(y)), q = exp(sampler_logp) (default π), constant."""
    theta = logits.clone().requires_grad_(True)
    logp = theta.log_softmax(-1)
    q = (logp if sampler_logp is None else sampler_logp).detach().exp()
    old = logp.detach() if old_logp is None else old_logp  # on-policy: π_old = π, ρ = 1 in value
    (q * form(logp, ref_logp, old)).sum().backward()
    return theta.grad


def reverse_kl_gradient(logits, ref_logp) -> torch.Tensor:
    pi = logits.softmax(-1)
    d = logits.log_softmax(-1) - ref_logp
    return pi * (d - (pi * d).sum())


def forward_kl_gradient(logits, ref_logp) -> torch.Tensor:
    return logits.softmax(-1) - ref_logp.exp()


def estimator(name):
    return lambda logp, ref, old: kl_estimate(logp, ref, name)


def bias_corrected(name):  # use_bias_correction_kl: ρ·estimate, ρ = π/π_old with its gradient
    return lambda logp, ref, old: kl_loss_term(logp, ref, old, name, use_bias_correction_kl=True)


def openrlhf_unbiased_gradient(logp, ref, old):
    """OpenRLHF's `--algo.kl.unbiased_gradient` (PR 1309), written from its description: the estimator's value
    (k3 here), gradient w·(log π − log π_ref)·∇log π with w = π/π_old detached (unclamped here)."""
    k2 = 0.5 * (logp - ref) ** 2
    w = (logp - old).exp().detach()
    return kl_estimate(logp, ref, "k3").detach() + w * (k2 - k2.detach())


def random_case(seed: int):
    g = torch.Generator().manual_seed(seed)
    logits, ref_logits, old_logits = (torch.randn(5, generator=g, dtype=torch.float64) for _ in range(3))
    return logits, ref_logits.log_softmax(-1), old_logits.log_softmax(-1)


# -- the hand-checked case -----------------------------------------------------------------------------------


def test_hand_checked_k3_descends_the_forward_kl_and_k3_plus_the_reverse():
    """π = (0.4, 0.3, 0.1, 0.1, 0.1), π_ref uniform. Forward: π − π_ref = (0.2, 0.1, −0.1, −0.1, −0.1).
    Reverse: d = log(π/0.2) = (log 2, log 1.5, log ½ ×3), KL = E_π[d] = 0.4·log 2 + 0.3·log 1.5 − 0.3·log 2,
    gradient π·(d − KL)."""
    logits = torch.tensor(PI, dtype=torch.float64).log()
    ref = torch.full((5,), math.log(0.2), dtype=torch.float64)
    kl = 0.4 * math.log(2) + 0.3 * math.log(1.5) - 0.3 * math.log(2)
    assert kl == pytest.approx(0.190954, abs=1e-6)
    reverse = [0.4 * (math.log(2) - kl), 0.3 * (math.log(1.5) - kl)] + [0.1 * (math.log(0.5) - kl)] * 3
    forward = [0.2, 0.1, -0.1, -0.1, -0.1]
    assert expected_gradient(estimator("k3"), logits, ref).tolist() == pytest.approx(forward, abs=1e-12)
    for form in (estimator("k2"), estimator("k3+"), estimator("k1+"), bias_corrected("k3"), bias_corrected("k1")):
        assert expected_gradient(form, logits, ref).tolist() == pytest.approx(reverse, abs=1e-12)
    assert expected_gradient(estimator("k1"), logits, ref).tolist() == pytest.approx([0.0] * 5, abs=1e-12)
    # and each estimate's value: k1, k3 (and k1+, k3+) average to the KL exactly, k2 does not
    pi = torch.tensor(PI, dtype=torch.float64)
    for name in ("k1", "k3", "k1+", "k3+"):
        assert (pi * kl_estimate(logits, ref, name)).sum().item() == pytest.approx(kl, abs=1e-12)


# -- every registered estimator keeps the promise of its properties ---------------------------------------


@pytest.mark.parametrize("name", KL_ESTIMATES.names())
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_each_estimators_loss_gradient_is_the_one_its_properties_claim(name, seed):
    """`loss_gradient` (on-policy) and, for `unbiased` estimators, the ratio-weighted form from π_old ≠ π:
    checked for every registered estimator, so a new one is held to what it declares."""
    logits, ref, old = random_case(seed)
    entry = KL_ESTIMATES[name]
    assert entry.loss_gradient is not None, f"{name}: register it with loss_gradient= (and unbiased=, if so)"
    claimed = {
        "reverse": reverse_kl_gradient(logits, ref),
        "forward": forward_kl_gradient(logits, ref),
        "zero": torch.zeros(5, dtype=torch.float64),
    }[entry.loss_gradient]
    torch.testing.assert_close(expected_gradient(estimator(name), logits, ref), claimed, rtol=1e-10, atol=1e-12)
    assert kl_loss_gradient(name) == entry.loss_gradient
    pi, logp = logits.softmax(-1), logits.log_softmax(-1)
    value = (pi * kl_estimate(logp, ref, name)).sum()
    reverse_kl = (pi * (logp - ref)).sum()
    if entry.unbiased:
        assert value.item() == pytest.approx(reverse_kl.item(), rel=1e-12)
        got = expected_gradient(bias_corrected(name), logits, ref, sampler_logp=old, old_logp=old)
        torch.testing.assert_close(got, reverse_kl_gradient(logits, ref), rtol=1e-10, atol=1e-12)
        assert kl_loss_gradient(name, use_bias_correction_kl=True) == "reverse"
    else:
        with pytest.raises(ValueError, match=f"not kl_estimator={name}"):
            kl_loss_gradient(name, use_bias_correction_kl=True)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_off_policy_only_the_ratio_weighted_forms_stay_exact(seed):
    """Sampled from π_old ≠ π (a later PPO epoch, num_iterations > 1, a stale rollout): ρ·k3 and OpenRLHF's
    detached-weight form still give ∇KL(π ‖ π_ref); k2 and k3+ give Σ_y π_old(y)·d(y)·∇log π(y) instead."""
    logits, ref, old = random_case(seed)
    exact = reverse_kl_gradient(logits, ref)
    for form in (bias_corrected("k3"), bias_corrected("k1"), openrlhf_unbiased_gradient):
        got = expected_gradient(form, logits, ref, sampler_logp=old, old_logp=old)
        torch.testing.assert_close(got, exact, rtol=1e-10, atol=1e-12)
    pi, q = logits.softmax(-1), old.exp()
    d = logits.log_softmax(-1) - ref
    biased = q * d - pi * (q * d).sum()  # Σ_y q(y)·d(y)·∇_θ log π(y), ∇_θ log π(y) = e_y − π
    for name in ("k2", "k3+"):
        got = expected_gradient(estimator(name), logits, ref, sampler_logp=old, old_logp=old)
        torch.testing.assert_close(got, biased, rtol=1e-10, atol=1e-12)
        assert (got - exact).abs().max() > 1e-3


def test_per_token_the_corrected_forms_share_one_gradient():
    """∂(ρ·k3)/∂log π = ρ·(log π − log π_ref) on every token, OpenRLHF's gradient; at ρ = 1 k2's, k1+'s and k3+'s.
    The straight-through forms keep their estimator's value to the bit."""
    g = torch.Generator().manual_seed(7)
    logp, ref, old = (torch.randn(4, 6, generator=g, dtype=torch.float64) for _ in range(3))

    def grad(form, old_logp):
        x = logp.clone().requires_grad_(True)
        form(x, ref, old_logp).sum().backward()
        return x.grad

    rho = (logp - old).exp()
    torch.testing.assert_close(grad(bias_corrected("k3"), old), rho * (logp - ref), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(grad(openrlhf_unbiased_gradient, old), rho * (logp - ref), rtol=1e-12, atol=1e-14)
    for name in ("k2", "k1+", "k3+"):
        torch.testing.assert_close(grad(estimator(name), logp), logp - ref, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(grad(bias_corrected("k3"), logp), logp - ref, rtol=1e-12, atol=1e-14)
    for name in ("k1", "k3"):
        assert torch.equal(kl_estimate(logp, ref, name + "+"), kl_estimate(logp, ref, name))
    torch.testing.assert_close(kl_loss_term(logp, ref, old, "k3", True), rho * kl_estimate(logp, ref, "k3"))


def test_kl_loss_term_defaults_and_errors():
    g = torch.Generator().manual_seed(8)
    logp, ref, old = (torch.randn(3, 5, generator=g) for _ in range(3))
    for name in KL_ESTIMATES.names():
        assert torch.equal(kl_loss_term(logp, ref, old, name), kl_estimate(logp, ref, name))
    with pytest.raises(ValueError, match="use_bias_correction_kl needs old_logprobs"):
        kl_loss_term(logp, ref, None, "k3", True)
    with pytest.raises(ValueError, match=r"the reverse KL's for \('k1', 'k3'\) only, not kl_estimator=k3\+"):
        kl_loss_term(logp, ref, old, "k3+", True)
    with pytest.raises(ValueError, match="kl_estimator must be one of"):
        kl_loss_term(logp, ref, old, "k4")


# -- GRPO's KL term ----------------------------------------------------------------------------------------


def test_grpo_kl_term_is_the_chosen_form_and_k3_by_default():
    """grpo_loss adds β·kl_loss_term(π, π_ref, π_old) on every token; the default is k3, unchanged to the bit."""
    g = torch.Generator().manual_seed(9)
    logp, old, ref = (torch.randn(6, 5, generator=g, dtype=torch.float64) * 0.3 for _ in range(3))
    mask = (torch.rand(6, 5, generator=g) > 0.3).double()
    adv = torch.randn(6, generator=g, dtype=torch.float64)
    args = (logp, old, adv, mask, 0.2, None)
    plain = grpo_loss(*args, 0.0, None, "bnpo")
    default = grpo_loss(*args, 0.1, ref, "bnpo")
    assert torch.equal(grpo_loss(*args, 0.1, ref, "bnpo", kl_estimator="k3").per_token, default.per_token)
    torch.testing.assert_close(default.per_token, plain.per_token + 0.1 * kl_estimate(logp, ref, "k3") * mask)
    for name, corrected in (("k3+", False), ("k2", False), ("k3", True), ("k1", True)):
        out = grpo_loss(*args, 0.1, ref, "bnpo", kl_estimator=name, use_bias_correction_kl=corrected)
        term = kl_loss_term(logp, ref, old, name, corrected)
        torch.testing.assert_close(out.per_token, plain.per_token + 0.1 * term * mask, rtol=1e-12, atol=1e-14)
        assert out.kl.item() == pytest.approx(((term * mask).sum() / mask.sum()).item(), rel=1e-12)
