"""The rollout engine's importance weights (TRL's four vllm_importance_sampling_mode values: TIS, Yao et al.
2025; MIS, arXiv:2510.18855; per token or per sequence), DeepSeek-V3.2's off-policy sequence mask, AReaL's
decoupled objective and the log-prob mismatch, in float64 against the papers' formulas written out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from alignlab.losses.grpo import grpo_loss
from alignlab.losses.ppo import ppo_policy_loss
from alignlab.losses.rollout_correction import (
    ROLLOUT_CORRECTIONS,
    decoupled_policy_loss,
    logprob_mismatch,
    masked_importance_weights,
    off_policy_sequence_mask,
    sequence_masked_importance_weights,
    sequence_truncated_importance_weights,
    truncated_importance_weights,
)


def t(rows):
    return torch.tensor(rows, dtype=torch.float64)


def close(values: torch.Tensor, rows: list[list[float]], rel: float = 1e-15) -> bool:
    """`values` [N, R] equal `rows` to within `rel`."""
    return values.flatten().tolist() == pytest.approx([x for row in rows for x in row], rel=rel)


def reference_weight(train: float, sampler: float, cap: float) -> float:
    """TIS as the paper writes it: min(π_train(y) / π_sampler(y), C), the probabilities themselves."""
    return min(math.exp(train) / math.exp(sampler), cap)


def test_truncated_weights_hand_checked():
    train = t([[-1.0, -2.0, -0.5], [-3.0, -0.1, -9.0]])
    sampler = t([[-1.0, -1.0, -2.0], [-2.0, -0.1, 0.0]])
    mask = t([[1, 1, 1], [1, 1, 0]])
    w = truncated_importance_weights(train, sampler, mask, cap=2.0)
    # equal: 1; one nat less likely under the trainer: e^-1; 1.5 nats more likely: e^1.5 = 4.48 capped at 2;
    # past the answer's end: 1 whatever the log-probs
    expected = [[1.0, math.exp(-1.0), 2.0], [math.exp(-1.0), 1.0, 1.0]]
    assert w.dtype == torch.float64
    assert w.flatten().tolist() == pytest.approx([x for row in expected for x in row], rel=1e-15)


def test_truncated_weights_random_against_the_paper():
    g = torch.Generator().manual_seed(0)
    train = -torch.rand(6, 9, generator=g, dtype=torch.float64) * 4
    sampler = train + torch.randn(6, 9, generator=g, dtype=torch.float64) * 0.8
    mask = (torch.rand(6, 9, generator=g) < 0.7).double()
    for cap in (1.0, 2.0, 5.0):
        w = truncated_importance_weights(train, sampler, mask, cap)
        for i in range(6):
            for j in range(9):
                want = reference_weight(train[i, j].item(), sampler[i, j].item(), cap) if mask[i, j] else 1.0
                assert w[i, j].item() == pytest.approx(want, rel=1e-12)
        assert (w <= cap).all()


def test_mismatch_mean_and_max_over_answer_tokens_only():
    train, sampler = t([[-1.0, -2.0, -5.0], [-0.5, -1.0, 0.0]]), t([[-1.5, -2.0, 0.0], [-0.25, -4.0, -7.0]])
    mask = t([[1, 1, 0], [1, 1, 0]])
    mean, most = logprob_mismatch(train, sampler, mask)
    assert mean.item() == pytest.approx((0.5 + 0.0 + 0.25 + 3.0) / 4, rel=1e-15)
    assert most.item() == 3.0
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(4, 7, generator=g, dtype=torch.float64), torch.randn(4, 7, generator=g, dtype=torch.float64)
    m = (torch.rand(4, 7, generator=g) < 0.5).double()
    diffs = [abs(a[i, j].item() - b[i, j].item()) for i in range(4) for j in range(7) if m[i, j]]
    mean, most = logprob_mismatch(a, b, m)
    assert mean.item() == pytest.approx(sum(diffs) / len(diffs), rel=1e-12) and most.item() == max(diffs)
    assert [v.item() for v in logprob_mismatch(a, b, torch.zeros_like(m))] == [0.0, 0.0]


def test_grpo_loss_weights_multiply_the_policy_term_only():
    """w·(clipped objective) per token, the k3 KL term unweighted; all-ones weights change nothing."""
    g = torch.Generator().manual_seed(2)
    logp = -torch.rand(3, 5, generator=g, dtype=torch.float64)
    old = logp + 0.1 * torch.randn(3, 5, generator=g, dtype=torch.float64)
    ref = logp + 0.1 * torch.randn(3, 5, generator=g, dtype=torch.float64)
    adv, mask = t([1.0, -0.5, 2.0]), t([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])
    w = 0.5 + torch.rand(3, 5, generator=g, dtype=torch.float64)
    args = (logp, old, adv, mask, 0.2, 0.28, 0.04, ref, "dapo")
    plain, ones = grpo_loss(*args), grpo_loss(*args, rollout_weights=torch.ones_like(w))
    assert ones.loss.item() == plain.loss.item()
    weighted = grpo_loss(*args, rollout_weights=w)
    total = 0.0
    for i in range(3):
        for j in range(5):
            if mask[i, j]:
                ratio, a = math.exp(logp[i, j].item() - old[i, j].item()), adv[i].item()
                objective = -min(ratio * a, min(max(ratio, 0.8), 1.28) * a)
                d = ref[i, j].item() - logp[i, j].item()
                total += w[i, j].item() * objective + 0.04 * (math.exp(d) - d - 1)
    assert weighted.loss.item() == pytest.approx(total / mask.sum().item(), rel=1e-12)


def test_ppo_policy_loss_weights_each_clipped_token():
    g = torch.Generator().manual_seed(3)
    logp = -torch.rand(2, 4, generator=g, dtype=torch.float64)
    old = logp + 0.3 * torch.randn(2, 4, generator=g, dtype=torch.float64)
    adv = torch.randn(2, 4, generator=g, dtype=torch.float64)
    mask, w = t([[1, 1, 1, 0], [1, 1, 1, 1]]), t([[0.5, 1.0, 2.0, 9.0], [1.5, 0.1, 1.0, 1.0]])
    assert ppo_policy_loss(logp, old, adv, mask, rollout_weights=torch.ones(2, 4, dtype=torch.float64)).loss.item() == (
        ppo_policy_loss(logp, old, adv, mask).loss.item()
    )
    total = 0.0
    for i in range(2):
        for j in range(4):
            if mask[i, j]:
                ratio, a = math.exp(logp[i, j].item() - old[i, j].item()), adv[i, j].item()
                total += w[i, j].item() * max(-a * ratio, -a * min(max(ratio, 0.8), 1.2))
    out = ppo_policy_loss(logp, old, adv, mask, rollout_weights=w)
    assert out.loss.item() == pytest.approx(total / 7, rel=1e-12)


def test_each_correction_mode_is_one_registered_function():
    assert ROLLOUT_CORRECTIONS.names() == ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")
    assert ROLLOUT_CORRECTIONS["token_truncate"].fn is truncated_importance_weights
    assert ROLLOUT_CORRECTIONS.names(level="sequence") == ("sequence_truncate", "sequence_mask")
    assert ROLLOUT_CORRECTIONS.names(masks=True) == ("token_mask", "sequence_mask")


def reference_weights(train, sampler, mask, mode: str, cap, clip_min) -> list[list[float]]:
    """TRL's modes from their definitions, one float at a time: ρ per token, or ρ = Π_t π_train/π_sampler over a
    completion's tokens; `truncate` clips ρ into [C_min, C_max], `mask` zeroes it outside; a token mode gives 1
    past an answer's end, a sequence mode its completion's weight on every position."""
    low, high = (-math.inf if clip_min is None else clip_min), (math.inf if cap is None else cap)

    def bound(rho: float) -> float:
        if mode.endswith("truncate"):
            return min(max(rho, low), high)
        return rho if low <= rho <= high else 0.0

    rows = []
    for i in range(len(train)):
        on = [j for j in range(len(train[i])) if mask[i][j]]
        if mode.startswith("sequence"):
            rho = math.prod(math.exp(train[i][j]) / math.exp(sampler[i][j]) for j in on)
            rows.append([bound(rho)] * len(train[i]))
        else:
            rows.append(
                [bound(math.exp(train[i][j] - sampler[i][j])) if j in on else 1.0 for j in range(len(train[i]))]
            )
    return rows


def test_modes_hand_checked():
    train = t([[-1.0, -2.0, -0.5], [-3.0, -0.1, -9.0]])
    sampler = t([[-1.0, -1.0, -2.0], [-2.0, -0.1, 0.0]])
    mask = t([[1, 1, 1], [1, 1, 0]])
    e = math.exp
    # per token ρ: [1, e^-1, e^1.5], [e^-1, 1, ·]; bounds [0.5, 2]: e^-1 = 0.37 is below C_min, e^1.5 = 4.48 above C_max
    token_mask = masked_importance_weights(train, sampler, mask, 2.0, 0.5)
    assert token_mask.tolist() == [[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]]
    token_trunc = truncated_importance_weights(train, sampler, mask, 2.0, 0.5)
    assert close(token_trunc, [[1.0, 0.5, 2.0], [0.5, 1.0, 1.0]], rel=1e-15)
    # per sequence: log ρ = 0 − 1 + 1.5 = 0.5 and −1 + 0 = −1 (the third token is past the end)
    seq_trunc = sequence_truncated_importance_weights(train, sampler, mask, 2.0, 0.5)
    assert close(seq_trunc, [[e(0.5)] * 3, [0.5] * 3], rel=1e-15)
    seq_mask = sequence_masked_importance_weights(train, sampler, mask, 2.0, 0.5)
    assert close(seq_mask, [[e(0.5)] * 3, [0.0] * 3], rel=1e-15)
    # without C_min only the upper bound binds; a mask mode may also leave C_max unset
    assert sequence_masked_importance_weights(train, sampler, mask, 1.5, None)[:, 0].tolist() == pytest.approx(
        [0.0, e(-1.0)], rel=1e-15
    )
    assert close(masked_importance_weights(train, sampler, mask, None, 0.5), [[1.0, 0.0, e(1.5)], [0.0, 1.0, 1.0]])


@pytest.mark.parametrize("mode", ["token_truncate", "token_mask", "sequence_truncate", "sequence_mask"])
def test_modes_random_against_their_definitions(mode):
    g = torch.Generator().manual_seed(4)
    train = -torch.rand(6, 9, generator=g, dtype=torch.float64) * 4
    sampler = train + torch.randn(6, 9, generator=g, dtype=torch.float64) * 0.3
    mask = (torch.rand(6, 9, generator=g) < 0.7).double()
    mask[0] = 0  # a row without tokens: ρ = 1
    fn = ROLLOUT_CORRECTIONS[mode].fn
    for cap, clip_min in ((2.0, None), (1.5, 0.5), (3.0, 0.9), (1.05, 0.95)):
        w = fn(train, sampler, mask, cap, clip_min)
        want = reference_weights(train.tolist(), sampler.tolist(), mask.tolist(), mode, cap, clip_min)
        assert w.dtype == torch.float64 and w.shape == train.shape
        assert w.flatten().tolist() == pytest.approx([x for row in want for x in row], rel=1e-12, abs=1e-300)


def test_default_mode_is_todays_weights_bit_for_bit():
    """token_truncate without C_min is exactly min(exp(Δ), C) on the answer and 1 past it, as before issue 34."""
    g = torch.Generator().manual_seed(5)
    train = -torch.rand(5, 11, generator=g) * 4
    sampler = train + torch.randn(5, 11, generator=g) * 0.5
    mask = (torch.rand(5, 11, generator=g) < 0.6).float()
    before = torch.where(mask > 0, torch.exp(train - sampler).clamp(max=2.0), torch.ones_like(train))
    assert torch.equal(truncated_importance_weights(train, sampler, mask, 2.0), before)


def test_off_policy_sequence_mask_hand_checked():
    """DeepSeek-V3.2 eq. 9: drop a completion iff A < 0 and mean_t (log π_behaviour − log π) > δ."""
    logp = t([[-1.0, -1.0, -1.0], [-1.0, -1.0, -1.0], [-2.0, -2.0, -5.0], [-1.0, 0.0, 0.0]])
    behaviour = t([[-0.2, -0.4, -9.0], [-0.2, -0.4, 0.0], [-2.0, -1.0, 0.0], [-1.0, 0.0, 0.0]])
    mask = t([[1, 1, 0], [1, 1, 0], [1, 1, 0], [0, 0, 0]])
    # mean drift over the answer's tokens: (0.8 + 0.6)/2 = 0.7, 0.7, (0 + 1)/2 = 0.5, no tokens: 0
    adv = t([-1.0, 1.0, -0.5, -2.0])
    keep = off_policy_sequence_mask(adv, logp, behaviour, mask, threshold=0.6)
    assert keep.shape == (4, 1) and keep.flatten().tolist() == [0.0, 1.0, 1.0, 1.0]
    assert off_policy_sequence_mask(adv, logp, behaviour, mask, 0.4).flatten().tolist() == [0.0, 1.0, 0.0, 1.0]
    assert off_policy_sequence_mask(t([0.0, 1.0, 0.0, 3.0]), logp, behaviour, mask, 0.0).flatten().tolist() == [1.0] * 4


def test_off_policy_sequence_mask_random():
    g = torch.Generator().manual_seed(6)
    logp = -torch.rand(8, 7, generator=g, dtype=torch.float64) * 3
    behaviour = logp + torch.randn(8, 7, generator=g, dtype=torch.float64) * 0.6
    mask = (torch.rand(8, 7, generator=g) < 0.7).double()
    adv = torch.randn(8, generator=g, dtype=torch.float64)
    logp.requires_grad_(True)
    keep = off_policy_sequence_mask(adv, logp, behaviour, mask, 0.2)
    assert not keep.requires_grad  # a constant of the loss, as TRL detaches the policy's log-probs
    for i in range(8):
        on = [j for j in range(7) if mask[i, j]]
        drift = sum(behaviour[i, j].item() - logp[i, j].item() for j in on) / max(len(on), 1)
        assert keep[i, 0].item() == (0.0 if adv[i] < 0 and drift > 0.2 else 1.0)


def test_decoupled_objective_hand_checked():
    """AReaL (Fu et al., 2025): −(π_prox/π_behav)·min(ρ·A, clip(ρ)·A), ρ = π/π_prox; the weight over the cap masks."""
    logp, prox, behav = (
        t([[math.log(0.6), math.log(0.3)]]),
        t([[math.log(0.5), math.log(0.5)]]),
        t([[math.log(0.25), 0.0]]),
    )
    mask = t([[1, 1]])
    # ρ = 1.2, 0.6; w = 2, 0.5; A = 1: min(1.2, 1.2) = 1.2 and min(0.6, 0.8) = 0.6
    loss = decoupled_policy_loss(logp, prox, behav, t([1.0]), mask, epsilon=0.2, epsilon_high=0.28)
    assert close(loss, [[-2.4, -0.3]], rel=1e-14)
    # A = −1: min(−1.2, −1.2) = −1.2, min(−0.6, −0.8) = −0.8; the cap 1.5 masks the first token's w = 2
    capped = decoupled_policy_loss(logp, prox, behav, t([-1.0]), mask, 0.2, 0.28, behaviour_weight_cap=1.5)
    assert close(capped, [[0.0, 0.4]], rel=1e-14)


def test_decoupled_objective_random_and_its_gradient():
    g = torch.Generator().manual_seed(7)
    logp = -torch.rand(4, 6, generator=g, dtype=torch.float64) * 3
    prox = (logp + 0.2 * torch.randn(4, 6, generator=g, dtype=torch.float64)).requires_grad_(True)
    behav = prox.detach() + 0.5 * torch.randn(4, 6, generator=g, dtype=torch.float64)
    adv, mask = torch.randn(4, generator=g, dtype=torch.float64), (torch.rand(4, 6, generator=g) < 0.8).double()
    logp.requires_grad_(True)
    loss = decoupled_policy_loss(logp, prox, behav, adv, mask, 0.2, 0.3, behaviour_weight_cap=2.0)
    for i in range(4):
        for j in range(6):
            rho, w = math.exp(logp[i, j].item() - prox[i, j].item()), math.exp(prox[i, j].item() - behav[i, j].item())
            a = adv[i].item()
            want = -(w if w <= 2.0 else 0.0) * min(rho * a, min(max(rho, 0.8), 1.3) * a) if mask[i, j] else 0.0
            assert loss[i, j].item() == pytest.approx(want, rel=1e-12, abs=1e-300)
    loss.sum().backward()
    assert prox.grad is None  # π_prox and the weight are constants; only π carries the gradient
    # with π_prox = π_behav the weight is 1: PPO's clipped objective
    same = decoupled_policy_loss(logp, prox.detach(), prox.detach(), adv, mask, 0.2, 0.3)
    ratio = torch.exp(logp - prox.detach())
    ppo = -torch.min(ratio * adv[:, None], ratio.clamp(0.8, 1.3) * adv[:, None]) * mask
    assert torch.equal(same, ppo)


def test_off_policy_mask_equals_trls_where_trl_is_installed():
    """TRL's GRPOTrainer.get_off_policy_mask on the same tensors (skipped without TRL, or a TRL without it)."""
    trl = pytest.importorskip("trl")
    reference = getattr(trl.GRPOTrainer, "get_off_policy_mask", None)
    if reference is None:
        pytest.skip(f"trl {trl.__version__} has no off-policy sequence masking")
    g = torch.Generator().manual_seed(9)
    logp = -torch.rand(7, 12, generator=g, dtype=torch.float64) * 3
    behaviour = logp + torch.randn(7, 12, generator=g, dtype=torch.float64) * 0.25
    mask, adv = (torch.rand(7, 12, generator=g) < 0.75).double(), torch.randn(7, 1, generator=g, dtype=torch.float64)
    for delta in (0.0, 0.05, 0.2, 0.5):
        want = reference(advantages=adv, per_token_logps=logp, sampling_per_token_logps=behaviour, mask=mask,
                         off_policy_threshold=delta)  # fmt: skip
        assert torch.equal(off_policy_sequence_mask(adv, logp, behaviour, mask, delta), want)
