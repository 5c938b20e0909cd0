"""PPO's options as pure functions, against float64 references written from their papers: Schulman's
KL estimators k1/k2/k3, the adaptive KL controller (Ziegler et al., 2019), dual clip (Ye et al., 2020),
the entropy bonus, the KL loss term and reward clipping; and their defaults equal to the plain PPO
formulas bit for bit."""

from __future__ import annotations

import math

import pytest
import torch

from alignlab.losses.ppo import ppo_policy_loss
from alignlab.losses.rlhf import adaptive_kl_coef, clip_scores, kl_estimate, kl_penalty_rewards


def t(rows):
    return torch.tensor(rows, dtype=torch.float64)


def reference_kl(logp: float, ref: float, estimator: str) -> float:
    """Schulman (2020), "Approximating KL Divergence": r = π_ref(x) / π(x) for x ~ π."""
    r = math.exp(ref - logp)
    return {"k1": -math.log(r), "k2": 0.5 * math.log(r) ** 2, "k3": (r - 1) - math.log(r)}[estimator]


# -- KL estimators -----------------------------------------------------------------------------------


def test_kl_estimators_hand_checked():
    # π(x) = 0.5, π_ref(x) = 0.25: r = 0.5, log r = −log 2
    logp, ref = t([math.log(0.5)]), t([math.log(0.25)])
    assert kl_estimate(logp, ref, "k1").item() == pytest.approx(math.log(2), abs=1e-15)
    assert kl_estimate(logp, ref, "k2").item() == pytest.approx(0.5 * math.log(2) ** 2, abs=1e-15)
    assert kl_estimate(logp, ref, "k3").item() == pytest.approx(-0.5 + math.log(2), abs=1e-15)
    # equal log-probs (and masked positions, 0 and 0): every estimator is exactly 0
    same = t([0.0, -1.3])
    for estimator in ("k1", "k2", "k3"):
        assert torch.equal(kl_estimate(same, same, estimator), t([0.0, 0.0]))
    with pytest.raises(ValueError, match="k4"):
        kl_estimate(logp, ref, "k4")


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_kl_estimators_match_the_formulas_on_random_log_probs(estimator):
    g = torch.Generator().manual_seed(7)
    logp = -torch.rand(5, 7, generator=g, dtype=torch.float64) * 4
    ref = -torch.rand(5, 7, generator=g, dtype=torch.float64) * 4
    got = kl_estimate(logp, ref, estimator)
    expected = [[reference_kl(a, b, estimator) for a, b in zip(x, y)] for x, y in zip(logp.tolist(), ref.tolist())]
    assert torch.allclose(got, t(expected), atol=1e-13, rtol=1e-13)
    if estimator != "k1":
        assert (got >= 0).all()


def test_k1_and_k3_average_to_the_exact_kl_under_the_policy():
    """E_{x~π}[k1] = E_{x~π}[k3] = KL(π ‖ π_ref) (unbiased), summed exactly over a categorical
    distribution; k2's mean is ½·E[(log r)²], not the KL."""
    g = torch.Generator().manual_seed(3)
    p = torch.softmax(torch.randn(11, generator=g, dtype=torch.float64), 0)
    q = torch.softmax(torch.randn(11, generator=g, dtype=torch.float64), 0)
    kl = float((p * (p.log() - q.log())).sum())
    for estimator in ("k1", "k3"):
        assert float((p * kl_estimate(p.log(), q.log(), estimator)).sum()) == pytest.approx(kl, rel=1e-12)
    k2 = float((p * kl_estimate(p.log(), q.log(), "k2")).sum())
    assert k2 == pytest.approx(float((p * 0.5 * (q.log() - p.log()) ** 2).sum()), rel=1e-12)


def test_kl_penalty_rewards_take_the_estimator():
    logp, ref = t([[-1.0, -2.0, -9.0]]), t([[-1.5, -1.0, -1.0]])
    mask, scores = t([[1, 1, 0]]), t([3.0])
    rewards, non_score = kl_penalty_rewards(logp, ref, scores, mask, kl_coef=0.1, kl_estimator="k3")
    k3 = [reference_kl(-1.0, -1.5, "k3"), reference_kl(-2.0, -1.0, "k3")]
    assert non_score.tolist()[0] == pytest.approx([-0.1 * k3[0], -0.1 * k3[1], 0.0], abs=1e-15)
    assert rewards.tolist()[0] == pytest.approx([-0.1 * k3[0], -0.1 * k3[1] + 3.0, 0.0], abs=1e-15)


def test_the_default_k1_penalty_is_the_plain_formula_bit_for_bit():
    g = torch.Generator().manual_seed(0)
    logp, ref = (-torch.rand(4, 6, generator=g) * 3 for _ in range(2))
    mask, scores = (torch.rand(4, 6, generator=g) > 0.3).float(), torch.randn(4, generator=g)
    rewards, non_score = kl_penalty_rewards(logp, ref, scores, mask, 0.05)
    assert torch.equal(non_score, -0.05 * (logp - ref) * mask)  # the formula before kl_estimator existed


# -- adaptive KL controller ----------------------------------------------------------------------------


def test_adaptive_kl_controller_hand_checked():
    # target 6, horizon 10000, 512 answers per rollout: n/horizon = 0.0512
    assert adaptive_kl_coef(0.1, 9.0, 6.0, 10000, 512) == pytest.approx(0.1 * (1 + 0.2 * 0.0512))  # error +0.5 → +0.2
    assert adaptive_kl_coef(0.1, 3.0, 6.0, 10000, 512) == pytest.approx(0.1 * (1 - 0.2 * 0.0512))  # error −0.5 → −0.2
    assert adaptive_kl_coef(0.1, 6.6, 6.0, 10000, 512) == pytest.approx(0.1 * (1 + 0.1 * 0.0512))  # inside the clip
    assert adaptive_kl_coef(0.1, 6.0, 6.0, 10000, 512) == 0.1  # on target: unchanged
    assert adaptive_kl_coef(0.1, 0.0, 6.0, 100, 100) == pytest.approx(0.08)  # KL 0 shrinks β by at most 20%·n/h


def test_adaptive_kl_controller_matches_ziegler_on_random_values():
    g = torch.Generator().manual_seed(1)
    for beta, kl, target, horizon, n in torch.rand(50, 5, generator=g, dtype=torch.float64).tolist():
        # n <= horizon: within one horizon the controller is the paper's
        beta, kl, target, horizon, n = beta, kl * 20, 0.5 + target * 10, 512 + horizon * 10000, 1 + int(n * 512)
        error = kl / target - 1
        error = 0.2 if error > 0.2 else -0.2 if error < -0.2 else error  # np.clip as in the paper's code
        expected = beta * (1 + error * n / horizon)
        assert adaptive_kl_coef(beta, kl, target, horizon, n) == pytest.approx(expected, rel=1e-12)


def test_adaptive_kl_controller_keeps_beta_positive_past_one_horizon():
    """kl_target=100, kl_horizon=1 (issue 32): the paper's uncapped step took β from 0.05 to −0.03 on a
    rollout of 8 answers far under target; the step is capped at one horizon, so β falls by 20% at most."""
    assert 0.05 * (1 - 0.2 * 8 / 1) < 0  # what the uncapped formula gives
    assert adaptive_kl_coef(0.05, 0.5, 100.0, 1, 8) == pytest.approx(0.04)
    beta = 0.05
    for _ in range(100):
        beta = adaptive_kl_coef(beta, 0.0, 100.0, 1, 8)
        assert beta > 0
    assert adaptive_kl_coef(0.05, 1e6, 100.0, 1, 8) == pytest.approx(0.06)  # and rises by 20% at most
    with pytest.raises(ValueError, match="horizon > 0"):
        adaptive_kl_coef(0.05, 1.0, 6.0, 0, 8)


def test_adaptive_kl_controller_steers_the_kl_to_its_target():
    """A toy policy whose KL falls as β rises (KL = 0.6 / β): iterating the controller from β = 0.01
    (KL 60) brings the KL to the target 6 and keeps it there."""
    beta = 0.01
    for _ in range(3000):
        beta = adaptive_kl_coef(beta, 0.6 / beta, 6.0, 1000, 64)
    assert 0.6 / beta == pytest.approx(6.0, rel=1e-3)


# -- dual clip, entropy bonus, KL loss term ---------------------------------------------------------------


def reference_dual_clip(logp, old, adv, eps, c):
    """Ye et al. (2020), eq. 5, as a loss: the clipped PPO loss, bounded by −c·A where A < 0."""
    ratio = math.exp(logp - old)
    loss = max(-adv * ratio, -adv * min(max(ratio, 1 - eps), 1 + eps))
    return min(loss, -c * adv) if adv < 0 else loss


def test_dual_clip_hand_checked_bounds_only_negative_advantages():
    # ratio 4 (far past 1 + ε): A = −2 gives the PPO loss 8, bounded by −c·A = 6; A = +2 keeps −2.4;
    # ratio 1.1 with A = −2 gives 2.2 < 6: unchanged.
    logp = t([[math.log(4.0), math.log(4.0), math.log(1.1)]]).requires_grad_(True)
    old, adv, mask = t([[0.0, 0.0, 0.0]]), t([[-2.0, 2.0, -2.0]]), t([[1, 1, 1]])
    plain = ppo_policy_loss(logp, old, adv, mask, cliprange=0.2)
    dual = ppo_policy_loss(logp, old, adv, mask, cliprange=0.2, dual_clip=3.0)
    assert plain.loss.item() == pytest.approx((8.0 - 2.4 + 2.2) / 3)
    assert dual.loss.item() == pytest.approx((6.0 - 2.4 + 2.2) / 3)
    assert dual.dual_clipfrac.item() == pytest.approx(1 / 3) and plain.dual_clipfrac is None
    dual.loss.backward()
    # the bounded token and the clipped one carry no gradient; the third: d(−A·ρ)/dlogπ = −A·ρ = 2.2, / 3 tokens
    assert logp.grad.tolist()[0] == pytest.approx([0.0, 0.0, 2.2 / 3])


@pytest.mark.parametrize("c", [1.5, 3.0])
def test_dual_clip_matches_the_paper_on_random_tokens(c):
    g = torch.Generator().manual_seed(int(c * 10))
    logp, old = torch.randn(6, 9, generator=g, dtype=torch.float64), torch.randn(6, 9, generator=g, dtype=torch.float64)
    adv = torch.randn(6, 9, generator=g, dtype=torch.float64) * 2
    mask = (torch.rand(6, 9, generator=g) > 0.25).double()
    out = ppo_policy_loss(logp, old, adv, mask, cliprange=0.2, dual_clip=c)
    per_token = [
        [reference_dual_clip(a, b, d, 0.2, c) for a, b, d in zip(x, y, z)]
        for x, y, z in zip(logp.tolist(), old.tolist(), adv.tolist())
    ]
    expected = float((t(per_token) * mask).sum() / mask.sum())
    assert out.loss.item() == pytest.approx(expected, rel=1e-12)
    assert out.loss.item() < ppo_policy_loss(logp, old, adv, mask, cliprange=0.2).loss.item()  # some were bounded
    plain = [  # c = ∞: no bound
        [reference_dual_clip(a, b, d, 0.2, math.inf) for a, b, d in zip(x, y, z)]
        for x, y, z in zip(logp.tolist(), old.tolist(), adv.tolist())
    ]
    bounded = t([[float(d < 0 and p > -c * d) for p, d in zip(x, z)] for x, z in zip(plain, adv.tolist())])
    assert bounded.sum() > 0
    assert out.dual_clipfrac.item() == pytest.approx(float((bounded * mask).sum() / mask.sum()), rel=1e-12)


def test_entropy_bonus_and_kl_loss_term_hand_checked():
    logp = t([[-1.0, -2.0, -0.5]]).requires_grad_(True)
    adv, mask = t([[1.0, -1.0, 4.0]]), t([[1, 1, 0]])
    entropy = t([[1.0, 2.0, 9.0]]).requires_grad_(True)
    ref = t([[-1.5, -1.0, 0.0]])
    kl = kl_estimate(logp, ref, "k3")
    out = ppo_policy_loss(logp, logp.detach(), adv, mask, entropy=entropy, entropy_coef=0.1, kl=kl, kl_coef=0.5)
    pg = (-1.0 + 1.0) / 2  # ratio 1: −A averaged over the 2 real tokens
    k3 = (reference_kl(-1.0, -1.5, "k3") + reference_kl(-2.0, -1.0, "k3")) / 2
    assert out.pg_loss.item() == pytest.approx(pg, abs=1e-15)
    assert out.kl.item() == pytest.approx(k3, rel=1e-14)
    assert out.loss.item() == pytest.approx(pg + 0.5 * k3 - 0.1 * (1.0 + 2.0) / 2, rel=1e-14)
    out.loss.backward()
    assert entropy.grad.tolist()[0] == pytest.approx([-0.05, -0.05, 0.0])  # −coef / tokens, none past the end
    # d/dlogπ of 0.5·k3 = 0.5·(1 − r) with r = π_ref/π, plus −A (ratio 1), over 2 tokens
    expected = [(-1.0 + 0.5 * (1 - math.exp(-0.5))) / 2, (1.0 + 0.5 * (1 - math.exp(1.0))) / 2, 0.0]
    assert logp.grad.tolist()[0] == pytest.approx(expected, rel=1e-12)


def test_entropy_bonus_and_kl_term_on_random_tokens_over_micro_batches():
    """Each term is a token mean over the step's tokens: micro-batch losses add up to the whole batch's,
    which is pg + kl_coef·mean(KL) − entropy_coef·mean(H) over the mask."""
    g = torch.Generator().manual_seed(5)
    logp, old, ref, adv, ent = (torch.randn(8, 5, generator=g, dtype=torch.float64) for _ in range(5))
    mask = (torch.rand(8, 5, generator=g) > 0.3).double()
    kl = kl_estimate(logp, ref, "k2")
    kwargs = {"dual_clip": 2.0, "entropy_coef": 0.01, "kl_coef": 0.2}
    whole = ppo_policy_loss(logp, old, adv, mask, entropy=ent, kl=kl, **kwargs)
    mean = lambda x: float((x * mask).sum() / mask.sum())  # noqa: E731
    plain = ppo_policy_loss(logp, old, adv, mask, dual_clip=2.0).loss.item()
    assert whole.loss.item() == pytest.approx(plain + 0.2 * mean(kl) - 0.01 * mean(ent), rel=1e-12)
    n = mask.sum()
    parts = sum(
        ppo_policy_loss(logp[s], old[s], adv[s], mask[s], entropy=ent[s], kl=kl[s], num_items_in_batch=n, **kwargs).loss
        for s in (slice(0, 3), slice(3, 5), slice(5, 8))
    )
    assert parts.item() == pytest.approx(whole.loss.item(), rel=1e-12)


def test_one_spelling_of_each_kl_estimator_serves_ppo_and_grpo():
    from alignlab.losses.grpo import k3_kl
    from alignlab.losses.reduction import masked_mean
    from alignlab.losses.rlhf import KL_ESTIMATES, KL_ESTIMATORS

    g = torch.Generator().manual_seed(3)
    logp, ref = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g)
    assert KL_ESTIMATORS == KL_ESTIMATES.names() and {"k1", "k2", "k3"} <= set(KL_ESTIMATORS)
    assert torch.equal(k3_kl(logp, ref), kl_estimate(logp, ref, "k3"))  # GRPO's KL term is the expm1 form
    d = (ref - logp).double()
    torch.testing.assert_close(k3_kl(logp, ref).double(), torch.expm1(d) - d, rtol=1e-6, atol=1e-7)
    mask = (torch.rand(5, 7, generator=g) > 0.3).float()
    out = ppo_policy_loss(logp, ref, torch.randn(5, 7, generator=g), mask)
    before = 0.5 * masked_mean((logp - ref) ** 2, mask)  # PPO's approxkl as it was written, ½·mean of squares
    assert torch.equal(out.approxkl, before)  # now the k2 estimate of π_old to π, to the bit


def test_the_default_policy_loss_is_the_plain_clipped_objective_bit_for_bit():
    g = torch.Generator().manual_seed(2)
    logp, old, adv = (torch.randn(4, 6, generator=g) for _ in range(3))
    mask = (torch.rand(4, 6, generator=g) > 0.3).float()
    entropy = torch.rand(4, 6, generator=g)
    out = ppo_policy_loss(logp, old, adv, mask, 0.2, num_items_in_batch=mask.sum() + 3, scale=2.0, entropy=entropy)
    ratio = torch.exp(logp - old)
    per_token = torch.max(-adv * ratio, -adv * torch.clamp(ratio, 0.8, 1.2))  # the loss before the options existed
    assert torch.equal(out.loss, (per_token * mask).sum() * 2.0 / (mask.sum() + 3))
    assert torch.equal(out.pg_loss, out.loss) and out.kl is None and out.dual_clipfrac is None


# -- reward clipping -------------------------------------------------------------------------------------


def test_clip_scores_hand_checked_and_random():
    assert clip_scores(t([-20.0, 0.5, 30.0, -10.0]), -10.0, 10.0).tolist() == [-10.0, 0.5, 10.0, -10.0]
    assert clip_scores(t([-3.0, 0.0, 3.0]), -1.0, 2.0).tolist() == [-1.0, 0.0, 2.0]
    g = torch.Generator().manual_seed(4)
    scores = torch.randn(100, generator=g, dtype=torch.float64) * 5
    expected = [min(max(s, -2.5), 1.5) for s in scores.tolist()]
    assert clip_scores(scores, -2.5, 1.5).tolist() == expected
