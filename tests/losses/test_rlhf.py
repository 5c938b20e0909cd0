"""RLHF math (masked statistics, KL-penalised rewards, GAE, PPO losses) against float64
references written as plain loops from the papers' formulas."""

from __future__ import annotations

import math

import pytest
import torch

from alignlab.losses.ppo import ppo_policy_loss, ppo_value_loss
from alignlab.losses.rlhf import gae, kl_penalty_rewards, masked_mean, masked_var, masked_whiten


def t(rows):
    return torch.tensor(rows, dtype=torch.float64)


MASK = t([[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0]])


def test_masked_mean_var_whiten_hand_checked():
    x = t([[1, 2, 3, 100], [4, 5, 6, 7], [8, -100, -100, -100]])
    valid = [1, 2, 3, 4, 5, 6, 7, 8]
    assert masked_mean(x, MASK).item() == pytest.approx(4.5)
    assert masked_mean(x, MASK, dim=1).tolist() == pytest.approx([2.0, 5.5, 8.0])
    var = sum((v - 4.5) ** 2 for v in valid) / 7  # unbiased
    assert masked_var(x, MASK).item() == pytest.approx(var)
    assert masked_var(x, MASK, unbiased=False).item() == pytest.approx(var * 7 / 8)
    white = masked_whiten(x, MASK)
    assert white[0, 0].item() == pytest.approx((1 - 4.5) / math.sqrt(var + 1e-8))
    assert masked_mean(white, MASK).item() == pytest.approx(0.0, abs=1e-12)
    assert masked_whiten(x, MASK, shift_mean=False)[0, 0].item() == pytest.approx((1 - 4.5) / math.sqrt(var) + 4.5)


def test_whitening_split_over_processes_equals_whitening_the_whole_batch():
    """Two 'processes' (threads) each holding half the rows, with `total` an all-reduce sum between
    them, whiten exactly as one process holding every row does."""
    import threading

    torch.manual_seed(0)
    x, mask = torch.randn(6, 5, dtype=torch.float64), (torch.rand(6, 5) < 0.7).double()
    barrier, slots = threading.Barrier(2), [None, None]

    def all_reduce_sum(rank):
        def total(value):
            slots[rank] = value
            barrier.wait()
            out = slots[0] + slots[1]
            barrier.wait()  # both have read before the next call overwrites the slots
            return out

        return total

    halves = [None, None]

    def process(rank):
        rows = slice(3 * rank, 3 * rank + 3)
        halves[rank] = masked_whiten(x[rows], mask[rows], total=all_reduce_sum(rank))

    threads = [threading.Thread(target=process, args=(r,)) for r in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    whole = masked_whiten(x, mask)
    assert torch.allclose(torch.cat(halves) * mask, whole * mask, atol=1e-12)
    assert not torch.allclose(masked_whiten(x[:3], mask[:3]) * mask[:3], whole[:3] * mask[:3])


def test_kl_penalty_on_every_token_and_score_at_the_last_one():
    logp = t([[-1.0, -2.0, -3.0, -9.0], [-1.0, -1.0, -1.0, -1.0], [-0.5, -9.0, -9.0, -9.0]])
    ref = t([[-1.5, -1.0, -3.0, -1.0], [-2.0, -2.0, -2.0, -2.0], [-1.0, -1.0, -1.0, -1.0]])
    scores = t([10.0, 20.0, 30.0])
    rewards, non_score = kl_penalty_rewards(logp, ref, scores, MASK, kl_coef=0.1)
    expected_ns = [[-0.05, 0.1, 0.0, 0.0], [-0.1, -0.1, -0.1, -0.1], [-0.05, 0.0, 0.0, 0.0]]
    assert non_score.tolist() == [pytest.approx(r) for r in expected_ns]
    expected = [[-0.05, 0.1, 10.0, 0.0], [-0.1, -0.1, -0.1, 19.9], [29.95, 0.0, 0.0, 0.0]]
    assert rewards.tolist() == [pytest.approx(r) for r in expected]


def reference_gae(rewards, values, lengths, gamma, lam):
    """Plain loop over each response's real tokens, V past the end = 0."""
    adv = [[0.0] * len(r) for r in rewards]
    for i, n in enumerate(lengths):
        running = 0.0
        for step in reversed(range(n)):
            next_value = values[i][step + 1] if step + 1 < n else 0.0
            delta = rewards[i][step] + gamma * next_value - values[i][step]
            running = delta + gamma * lam * running
            adv[i][step] = running
    return adv


def test_gae_hand_checked():
    # one response of 2 tokens, gamma = 1, lam = 0.5: δ1 = 1 + 0 − 0.5, δ0 = 0 + 0.5 − 0.2, A0 = δ0 + 0.5·δ1
    adv, ret = gae(t([[0.0, 1.0]]), t([[0.2, 0.5]]), t([[1, 1]]), gamma=1.0, lam=0.5)
    assert adv.tolist()[0] == pytest.approx([0.3 + 0.25, 0.5])
    assert ret.tolist()[0] == pytest.approx([0.75, 1.0])


@pytest.mark.parametrize(("gamma", "lam"), [(1.0, 0.95), (0.99, 0.9), (1.0, 1.0), (0.5, 0.0)])
def test_gae_matches_a_plain_loop(gamma, lam):
    g = torch.Generator().manual_seed(int(gamma * 100 + lam * 10))
    n, r = 6, 9
    lengths = [9, 1, 5, 3, 9, 7]
    mask = t([[1.0] * k + [0.0] * (r - k) for k in lengths])
    rewards, values = (
        torch.randn(n, r, generator=g, dtype=torch.float64),
        torch.randn(n, r, generator=g, dtype=torch.float64),
    )
    adv, ret = gae(rewards, values, mask, gamma, lam)
    masked_r, masked_v = (rewards * mask).tolist(), (values * mask).tolist()
    expected = reference_gae(masked_r, masked_v, lengths, gamma, lam)
    assert torch.allclose(adv, t(expected), atol=1e-12)
    assert torch.allclose(ret, (t(expected) + values) * mask, atol=1e-12)
    assert (adv[mask == 0] == 0).all()


def test_ppo_policy_loss_against_the_clipped_objective():
    logp, old = t([[-1.0, -2.0, -0.5]]), t([[-1.5, -1.5, -0.5]])
    adv, mask = t([[1.0, -2.0, 3.0]]), t([[1, 1, 0]])
    out = ppo_policy_loss(logp, old, adv, mask, cliprange=0.2)
    r0, r1 = math.exp(0.5), math.exp(-0.5)
    # token 0: A>0, ratio 1.65 > 1.2 -> clipped: -1·1.2; token 1: A<0, ratio 0.61 < 0.8 -> clipped: 2·0.8
    per_token = [max(-1 * r0, -1 * 1.2), max(2 * r1, 2 * 0.8)]
    assert out.loss.item() == pytest.approx(sum(per_token) / 2)
    assert out.clipfrac.item() == pytest.approx(1.0)  # token 0: −1.2 > −1.65; token 1: 1.6 > 1.21
    out = ppo_policy_loss(logp, old, t([[-1.0, 2.0, 0.0]]), mask, cliprange=0.2)
    assert out.clipfrac.item() == pytest.approx(0.0)  # signs flipped: the unclipped term is the larger
    assert out.approxkl.item() == pytest.approx(0.5 * (0.25 + 0.25) / 2)
    assert out.ratio.item() == pytest.approx((r0 + r1) / 2)


def test_ratio_one_gives_minus_advantage_and_its_gradient():
    logp = t([[-1.0, -2.0]]).requires_grad_(True)
    adv = t([[2.0, -1.0]])
    out = ppo_policy_loss(logp, logp.detach(), adv, t([[1, 1]]))
    assert out.loss.item() == pytest.approx(-0.5)
    out.loss.backward()
    assert logp.grad.tolist()[0] == pytest.approx([-1.0, 0.5])  # d(−A·ρ)/dlogπ at ρ = 1 is −A, / 2 tokens


def test_ppo_value_loss_hand_checked():
    v, old, ret, mask = t([[1.0, 0.0, 5.0]]), t([[0.5, 0.0, 0.0]]), t([[2.0, 1.0, 0.0]]), t([[1, 1, 0]])
    loss, clipfrac = ppo_value_loss(v, old, ret, mask, cliprange_value=0.2)
    # token 0: unclipped (1−2)² = 1, clipped V = 0.7 -> (0.7−2)² = 1.69; token 1: both 1
    assert loss.item() == pytest.approx(0.5 * (1.69 + 1.0) / 2)
    assert clipfrac.item() == pytest.approx(0.5)


def test_normalised_micro_batch_losses_add_up_to_the_mini_batch_loss():
    g = torch.Generator().manual_seed(0)
    logp, old, adv = (torch.randn(8, 5, generator=g, dtype=torch.float64) for _ in range(3))
    mask = (torch.rand(8, 5, generator=g) > 0.3).double()
    whole = ppo_policy_loss(logp, old, adv, mask).loss
    total = mask.sum()
    parts = sum(
        ppo_policy_loss(logp[i : i + 3], old[i : i + 3], adv[i : i + 3], mask[i : i + 3], num_items_in_batch=total).loss
        for i in (0, 3, 6)
    )
    assert parts.item() == pytest.approx(whole.item(), rel=1e-12)
