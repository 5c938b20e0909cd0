"""DPO's further loss types, f-divergences, LD-DPO, WPO, KTO's APO-zero and CPO's loss types, against
float64 references written from each paper's formula (hand-checked numbers, then random batches)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from alignlab.losses import (
    CPO_LOSS_TYPES,
    CPO_LOSSES,
    DPO_LOSSES,
    F_DIVERGENCE_LOSS_TYPES,
    F_DIVERGENCE_TYPES,
    KTO_LOSSES,
    PAIR_LOSS_TYPES,
    SORTING_LOSS_TYPES,
    alphapo_reward,
    cpo_loss,
    dpo_loss,
    f_divergence_scores,
    kto_loss,
    length_desensitised_logps,
    wpo_weights,
)


def t(*xs):
    return torch.tensor(xs, dtype=torch.float64)


def sig(x: float) -> float:
    return 1 / (1 + math.exp(-x)) if x >= 0 else math.exp(x) / (1 + math.exp(x))


def log_sig(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


# r_w = (-1) - (-2) = 1, r_l = (-3) - (-2) = -1: h = 2
PAIR = (t(-1.0), t(-3.0), t(-2.0), t(-2.0))


def loss(loss_type, beta, **kw):
    return dpo_loss(*PAIR, beta=beta, loss_type=loss_type, **kw).losses.item()


def test_hand_checked_reward_based_losses():
    # βr_w = 0.5, βr_l = -0.5
    assert loss("bco_pair", 0.5) == pytest.approx(2 * math.log1p(math.exp(-0.5)), abs=1e-12)
    nca = 1.5 * math.log1p(math.exp(-0.5)) + 0.5 * math.log1p(math.exp(0.5))
    assert loss("nca_pair", 0.5) == pytest.approx(nca, abs=1e-12)
    assert loss("sppo_hard", 0.5) == pytest.approx(0.0, abs=1e-12)  # r_w = 1/(2β), r_l = -1/(2β)
    assert loss("sppo_hard", 0.25) == pytest.approx(2.0, abs=1e-12)  # (1 - 2)² + (-1 + 2)²
    assert loss("apo_zero", 0.5) == pytest.approx(2 * sig(-0.5), abs=1e-12)  # (1 - σ(0.5)) + σ(-0.5)
    assert loss("apo_down", 0.5) == pytest.approx(sig(0.5) + sig(-1.0), abs=1e-12)  # σ(0.5) + 1 - σ(1)


def test_hand_checked_margin_based_losses():
    # βh = 1
    exo = sig(1) * (log_sig(1) - math.log(0.9)) + sig(-1) * (log_sig(-1) - math.log(0.1))
    assert loss("exo_pair", 0.5, label_smoothing=0.1) == pytest.approx(exo, abs=1e-12)
    mix = sig(1 / 0.05)  # σ(20): almost all exponential
    assert loss("discopop", 0.5) == pytest.approx(mix * math.exp(-1) + (1 - mix) * math.log1p(math.exp(-1)), abs=1e-12)
    mix = sig(1 / 2.0)
    disco = mix * math.exp(-1) + (1 - mix) * math.log1p(math.exp(-1))
    assert loss("discopop", 0.5, discopop_tau=2.0) == pytest.approx(disco, abs=1e-12)
    # answers of 2 and 4 tokens: h = 1/2 - (-1)/4 = 0.75
    lengths = {"chosen_lengths": t(2.0), "rejected_lengths": t(4.0)}
    assert loss("sigmoid_norm", 0.5, **lengths) == pytest.approx(math.log1p(math.exp(-0.375)), abs=1e-12)
    assert loss("ipo", 0.5, ipo_normalize_length=True, **lengths) == pytest.approx(0.0625, abs=1e-12)  # (0.75-1)²
    assert loss("ipo", 0.5, **lengths) == pytest.approx(1.0, abs=1e-12)  # summed: (2 - 1)², lengths unread


def test_exo_pair_is_the_kl_between_the_two_answer_distributions():
    """EXO eq. 16 for K = 2: KL(q ‖ p) with q = softmax(β·r over the pair), p = (1-ε, ε)."""
    eps = 1e-3
    for beta in (0.1, 1.0):
        q = torch.softmax(torch.tensor([beta * 1.0, beta * -1.0], dtype=torch.float64), 0)
        p = t(1 - eps, eps)
        kl = (q * (q.log() - p.log())).sum().item()
        assert loss("exo_pair", beta, label_smoothing=eps) == pytest.approx(kl, abs=1e-12)


def test_hand_checked_f_divergences():
    """r_w = 1, r_l = -1, β = 0.5, sigmoid loss −log σ(β·(f'(e^r_w) − f'(e^r_l)))."""
    hs = {
        "forward_kl": math.e - math.exp(-1),  # (1 - e^-1) - (1 - e)
        "js_divergence": 1.0,  # log σ(1) - log σ(-1) = 1
        "alpha_divergence": 4 * math.sinh(0.5),  # α = 0.5: 2(1 - e^-½) - 2(1 - e^½)
        "reverse_kl": 2.0,
    }
    for kind, h in hs.items():
        assert loss("sigmoid", 0.5, f_divergence_type=kind) == pytest.approx(math.log1p(math.exp(-0.5 * h)), abs=1e-12)
    # α → 1 is the reverse KL
    assert loss("sigmoid", 0.5, f_divergence_type="alpha_divergence", f_alpha_divergence_coef=1.0) == loss(
        "sigmoid", 0.5
    )


def test_f_divergence_refused_for_losses_it_does_not_generalise():
    for loss_type in sorted(set(PAIR_LOSS_TYPES) - set(F_DIVERGENCE_LOSS_TYPES)):
        with pytest.raises(ValueError, match="f_divergence_type"):
            loss(loss_type, 0.5, f_divergence_type="forward_kl")


def test_aot_sorts_the_batch_before_comparing():
    # policy log-ratio log π_w - log π_l per pair: [3, 1]; reference's: [0, 2] -> sorted [1, 3] - [0, 2] = [1, 1]
    pc, pr, rc, rr = t(-1.0, -3.0), t(-4.0, -4.0), t(-2.0, -1.0), t(-2.0, -3.0)
    out = dpo_loss(pc, pr, rc, rr, beta=1.0, loss_type="aot")
    assert torch.allclose(out.losses, t(math.log1p(math.exp(-1)), math.log1p(math.exp(-1))))
    # unpaired: r_w = [1, -2], r_l = [-2, -1] -> sorted [-2, 1] - [-2, -1] = [0, 2]
    out = dpo_loss(pc, pr, rc, rr, beta=1.0, loss_type="aot_unpaired")
    assert torch.allclose(out.losses, t(math.log(2), math.log1p(math.exp(-2))))
    assert torch.allclose(out.chosen_rewards, t(1.0, -2.0))  # rewards stay per pair, unsorted


def test_every_loss_type_cites_its_paper_and_has_its_docs_row():
    """A loss type is one registered function: its docstring names its paper, docs/algorithms.md its row."""
    docs = (Path(__file__).parents[2] / "docs" / "algorithms.md").read_text()
    for registry in (DPO_LOSSES, CPO_LOSSES, KTO_LOSSES):
        for name in registry:
            assert "arXiv:" in registry[name].fn.__doc__, (registry.kind, name)
    for name in DPO_LOSSES:
        assert f"| `{name}` |" in docs, f"docs/algorithms.md has no row for the DPO loss type {name}"


def test_exo_pair_needs_label_smoothing_and_sigmoid_norm_needs_lengths():
    with pytest.raises(ValueError, match="label_smoothing > 0"):
        loss("exo_pair", 0.5)
    with pytest.raises(ValueError, match="token counts"):
        loss("sigmoid_norm", 0.5)
    with pytest.raises(ValueError, match="sft is nll_loss"):
        loss("sft", 0.5)


def reference_pair(pc, pr, rc, rr, lw, ll, beta, loss_type, eps, tau, normalise, kind, alpha):
    """One pair, scalar float64 math written from each paper."""
    rw, rl = pc - rc, pr - rr

    def score(r):  # f'(u) at u = e^r, up to a constant (f-DPO, Wang et al. 2023, table 1)
        u = math.exp(r)
        if kind == "reverse_kl":
            return math.log(u)
        if kind == "forward_kl":
            return 1 - 1 / u  # TRL's constant 1 matters once a loss divides each score by its length
        if kind == "js_divergence":
            return math.log(2 * u / (1 + u))
        return (u ** (alpha - 1) - 1) / (alpha - 1)

    h = score(rw) - score(rl)
    if loss_type == "sigmoid_norm" or (loss_type == "ipo" and normalise):
        h = score(rw) / lw - score(rl) / ll
    if loss_type == "sigmoid":
        return -(1 - eps) * log_sig(beta * h) - eps * log_sig(-beta * h)
    if loss_type == "hinge":
        return max(0.0, 1 - beta * h)
    if loss_type == "ipo":
        return (h - 1 / (2 * beta)) ** 2
    if loss_type == "robust":
        return ((1 - eps) * -log_sig(beta * h) - eps * -log_sig(-beta * h)) / (1 - 2 * eps)
    if loss_type == "exo_pair":  # KL(q || p) over the two answers
        qw, ql = sig(beta * h), sig(-beta * h)
        return qw * math.log(qw / (1 - eps)) + ql * math.log(ql / eps)
    if loss_type == "nca_pair":  # NCA: −log σ(r_w) − ½ Σ_y log σ(−r_y)
        return -log_sig(beta * rw) - 0.5 * (log_sig(-beta * rw) + log_sig(-beta * rl))
    if loss_type == "bco_pair":
        return -log_sig(beta * rw) - log_sig(-beta * rl)
    if loss_type == "sppo_hard":  # (log π/π_ref − (P − ½)/β)², P = 1 for the winner and 0 for the loser
        return (rw - (1 - 0.5) / beta) ** 2 + (rl - (0 - 0.5) / beta) ** 2
    if loss_type == "apo_zero":
        return (1 - sig(beta * rw)) + sig(beta * rl)
    if loss_type == "apo_down":
        return sig(beta * rw) + (1 - sig(beta * (rw - rl)))
    if loss_type == "discopop":  # LRML
        rho = beta * h
        return (1 - sig(rho / tau)) * -log_sig(rho) + sig(rho / tau) * math.exp(-rho)
    if loss_type == "sigmoid_norm":
        return -log_sig(beta * h)
    raise AssertionError(loss_type)


UNSORTED = [lt for lt in PAIR_LOSS_TYPES if lt not in SORTING_LOSS_TYPES]
# Every loss type with the reverse KL, and those an f-divergence generalises with each other one.
WITH_DIVERGENCES = [
    (lt, k) for k in F_DIVERGENCE_TYPES for lt in UNSORTED if k == "reverse_kl" or lt in F_DIVERGENCE_LOSS_TYPES
]


@pytest.mark.parametrize(("loss_type", "kind"), WITH_DIVERGENCES)
@pytest.mark.parametrize("beta", [0.05, 0.5, 2.0])
def test_random_batches_match_reference(loss_type, kind, beta):
    g = torch.Generator().manual_seed(UNSORTED.index(loss_type) * 100 + F_DIVERGENCE_TYPES.index(kind) * 10)
    scale = 20 if kind == "reverse_kl" else 3  # f-divergence scores grow as e^|r|
    pc, pr, rc, rr = (-torch.rand(32, generator=g, dtype=torch.float64) * scale for _ in range(4))
    lw, ll = (torch.randint(1, 30, (32,), generator=g).double() for _ in range(2))
    eps, tau, alpha = 0.1, 0.3, 0.4
    for normalise in (False, True):
        out = dpo_loss(
            pc, pr, rc, rr, beta=beta, loss_type=loss_type, label_smoothing=eps, discopop_tau=tau,
            chosen_lengths=lw, rejected_lengths=ll, ipo_normalize_length=normalise,
            f_divergence_type=kind, f_alpha_divergence_coef=alpha,
        )  # fmt: skip
        rows = zip(*(x.tolist() for x in (pc, pr, rc, rr, lw, ll)))
        expected = [reference_pair(*row, beta, loss_type, eps, tau, normalise, kind, alpha) for row in rows]
        assert torch.allclose(out.losses, torch.tensor(expected, dtype=torch.float64), rtol=1e-9, atol=1e-10)
        assert torch.allclose(out.chosen_rewards, beta * (pc - rc))


@pytest.mark.parametrize("seed", range(3))
def test_aot_random_batches_match_reference(seed):
    """AOT's first-order stochastic dominance: compare the i-th smallest policy margin with the i-th smallest
    reference margin (paired) or the i-th smallest chosen log-ratio with the i-th smallest rejected one."""
    g = torch.Generator().manual_seed(seed)
    pc, pr, rc, rr = (-torch.rand(16, generator=g, dtype=torch.float64) * 20 for _ in range(4))
    beta, eps = 0.3, 0.2
    margins = sorted((a - b) for a, b in zip(pc.tolist(), pr.tolist()))
    ref_margins = sorted((a - b) for a, b in zip(rc.tolist(), rr.tolist()))
    chosen = sorted((a - b) for a, b in zip(pc.tolist(), rc.tolist()))
    rejected = sorted((a - b) for a, b in zip(pr.tolist(), rr.tolist()))
    for loss_type, deltas in (("aot", zip(margins, ref_margins)), ("aot_unpaired", zip(chosen, rejected))):
        expected = [-(1 - eps) * log_sig(beta * (a - b)) - eps * log_sig(-beta * (a - b)) for a, b in deltas]
        out = dpo_loss(pc, pr, rc, rr, beta=beta, loss_type=loss_type, label_smoothing=eps)
        assert torch.allclose(out.losses, t(*expected), rtol=1e-10, atol=1e-12)


def test_forward_kl_score_matches_the_papers_derivative_up_to_a_constant():
    r = t(-2.0, 0.0, 1.5)
    assert torch.allclose(f_divergence_scores(r, "forward_kl") - 1, -torch.exp(-r))  # f(u) = −log u: f'(u) = −1/u


def test_length_desensitised_logps_hand_checked():
    # chosen 3 answer tokens, rejected 1 (after a prompt token): ℓ = 1
    token_logps = t(0.0, -1.0, -2.0, -4.0, 0.0, -8.0, 0.0, 0.0).reshape(2, 4)
    mask = t(0.0, 1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 0.0).reshape(2, 4)
    shared = t(1.0, 1.0)
    assert torch.allclose(length_desensitised_logps(token_logps, mask, shared, 0.5), t(-1.0 - 0.5 * 6, -8.0))
    assert torch.allclose(length_desensitised_logps(token_logps, mask, shared, 1.0), t(-7.0, -8.0))
    assert torch.allclose(length_desensitised_logps(token_logps, mask, shared, 0.0), t(-1.0, -8.0))


def test_length_desensitised_logps_random():
    g = torch.Generator().manual_seed(0)
    token_logps = -torch.rand(6, 9, generator=g, dtype=torch.float64)
    mask = (torch.rand(6, 9, generator=g) > 0.3).double()
    token_logps = token_logps * mask
    shared = torch.randint(0, 9, (6,), generator=g).double()
    out = length_desensitised_logps(token_logps, mask, shared, 0.3)
    for i in range(6):
        answer = [token_logps[i, j].item() for j in range(9) if mask[i, j]]
        expected = sum(answer[: int(shared[i])]) + 0.3 * sum(answer[int(shared[i]) :])
        assert out[i].item() == pytest.approx(expected, abs=1e-12)


def test_wpo_weights_hand_checked():
    # two answer positions: p(token) = 0.5 under (0.5, 0.5) -> ratio 1; p = 0.25 under (0.5, 0.25, 0.25) -> 2/3
    token_logps = torch.log(t(0.5, 0.25, 1.0)).reshape(1, 3)
    sum_sq = torch.log(t(0.5, 0.375, 1.0)).reshape(1, 3)
    mask = t(1.0, 1.0, 0.0).reshape(1, 3)
    assert wpo_weights(token_logps, sum_sq, mask).item() == pytest.approx(math.sqrt(2 / 3), abs=1e-12)


def test_wpo_weights_random_and_detached():
    g = torch.Generator().manual_seed(1)
    probs = torch.softmax(torch.randn(3, 5, 7, generator=g, dtype=torch.float64), -1)
    tokens = torch.randint(0, 7, (3, 5), generator=g)
    mask = (torch.rand(3, 5, generator=g) > 0.2).double()
    token_logps = probs.gather(-1, tokens[..., None]).squeeze(-1).log().requires_grad_()
    weights = wpo_weights(token_logps, (probs**2).sum(-1).log(), mask)
    assert not weights.requires_grad
    for i in range(3):
        ratios = [probs[i, j, tokens[i, j]].item() / (probs[i, j] ** 2).sum().item() for j in range(5) if mask[i, j]]
        assert weights[i].item() == pytest.approx(math.prod(ratios) ** (1 / len(ratios)), rel=1e-12)


def test_kto_apo_zero_unpaired_hand_checked_and_ignores_the_reference_point():
    policy, ref = t(-1.0, -3.0), t(-2.0, -2.0)  # r = [1, -1]
    desirable = torch.tensor([True, False])
    out = kto_loss(policy, ref, desirable, t(5.0)[0], beta=0.5, desirable_weight=2.0, loss_type="apo_zero_unpaired")
    assert torch.allclose(out.losses, t(2 * (1 - sig(0.5)), sig(-0.5)))
    same = kto_loss(policy, ref, desirable, t(0.0)[0], beta=0.5, desirable_weight=2.0, loss_type="apo_zero_unpaired")
    assert torch.equal(out.losses, same.losses)


def test_kto_apo_zero_unpaired_random():
    g = torch.Generator().manual_seed(2)
    policy, ref = (-torch.rand(20, generator=g, dtype=torch.float64) * 10 for _ in range(2))
    desirable = torch.rand(20, generator=g) > 0.5
    out = kto_loss(policy, ref, desirable, t(0.3)[0], 0.2, 1.5, 0.7, loss_type="apo_zero_unpaired")
    expected = [
        1.5 * (1 - sig(0.2 * (p - r))) if d else 0.7 * sig(0.2 * (p - r))
        for p, r, d in zip(policy.tolist(), ref.tolist(), desirable.tolist())
    ]
    assert torch.allclose(out.losses, t(*expected), rtol=1e-12)


def reference_cpo(w, lo, beta, loss_type, alpha, gamma):
    def r(logp):  # AlphaPO eq. 6: (1 − p^−α)/α, log p at α = 0
        return logp if alpha == 0 else (1 - math.exp(logp) ** -alpha) / alpha

    d = r(w) - r(lo)
    if loss_type == "sigmoid":
        return -log_sig(beta * d)
    if loss_type == "hinge":
        return max(0.0, 1 - beta * d)
    if loss_type == "ipo":
        return (d - 1 / (2 * beta)) ** 2
    return -log_sig(beta * d - gamma)


def test_cpo_loss_types_hand_checked():
    w, lo = t(-1.0), t(-3.0)  # d = 2
    assert cpo_loss(w, lo, 0.25, "hinge").losses.item() == pytest.approx(0.5)
    assert cpo_loss(w, lo, 0.5, "ipo").losses.item() == pytest.approx(1.0)  # (2 - 1)²
    assert cpo_loss(w, lo, 0.5, "alphapo", alpha=0.0, simpo_gamma=0.5).losses.item() == pytest.approx(
        math.log1p(math.exp(-0.5))
    )
    # α = 1: r = 1 - 1/p = 1 - e^{-log p}: r_w = 1 - e, r_l = 1 - e³; d = e³ - e
    out = cpo_loss(w, lo, 0.1, "alphapo", alpha=1.0, simpo_gamma=0.0)
    assert out.losses.item() == pytest.approx(math.log1p(math.exp(-0.1 * (math.e**3 - math.e))), abs=1e-12)
    assert out.chosen_rewards.item() == pytest.approx(0.1 * (1 - math.e))
    assert alphapo_reward(t(-1.0), 0.0).item() == -1.0


@pytest.mark.parametrize("loss_type", CPO_LOSS_TYPES)
@pytest.mark.parametrize("alpha", [0.0, 0.25, -0.5])
def test_cpo_random_batches_match_reference(loss_type, alpha):
    g = torch.Generator().manual_seed(CPO_LOSS_TYPES.index(loss_type) * 10 + int(alpha * 4))
    w, lo = (-torch.rand(16, generator=g, dtype=torch.float64) * 3 for _ in range(2))
    out = cpo_loss(w, lo, 0.7, loss_type, alpha=alpha, simpo_gamma=0.4)
    expected = [reference_cpo(a, b, 0.7, loss_type, alpha, 0.4) for a, b in zip(w.tolist(), lo.tolist())]
    assert torch.allclose(out.losses, t(*expected), rtol=1e-10, atol=1e-12)
