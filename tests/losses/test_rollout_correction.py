"""The rollout engine's truncated importance weights (Yao et al., 2025) and the log-prob mismatch, in float64."""

from __future__ import annotations

import math

import pytest
import torch

from alignlab.losses.grpo import grpo_loss
from alignlab.losses.ppo import ppo_policy_loss
from alignlab.losses.rollout_correction import ROLLOUT_CORRECTIONS, logprob_mismatch, truncated_importance_weights


def t(rows):
    return torch.tensor(rows, dtype=torch.float64)


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
    assert ROLLOUT_CORRECTIONS.names() == ("token_truncate",)  # TRL's default mode; issue 34 adds the others
    assert ROLLOUT_CORRECTIONS["token_truncate"].fn is truncated_importance_weights
