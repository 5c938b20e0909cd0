"""GRPO's advantage estimators, the KL as a reward penalty and DAPO's overlong penalty against float64
references written from the papers (hand-checkable numbers and random ones)."""

from __future__ import annotations

import math
import sys
import textwrap

import pytest
import torch

from alignlab.errors import ConfigError
from alignlab.losses.grpo import (
    ADVANTAGES,
    DEFAULT_SCALE_REWARDS,
    AdvantageInputs,
    estimate_advantages,
    group_advantages,
    kl_reward_penalty,
    reinforce_plus_plus_advantages,
    rloo_advantages,
    soft_overlong_penalty,
)


def t(rows):
    return torch.tensor(rows, dtype=torch.float64)


def stdev(xs):
    m = sum(xs) / len(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def random_rewards(seed: int, groups: int = 5, g: int = 4) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(groups * g, generator=gen, dtype=torch.float64)


# -- RLOO (Ahmadian et al., 2024): r_i − mean of the other G−1 rewards -------------------------------
def test_rloo_hand_checked():
    # group [1, 0, 0, 1]: a 1 sees others' mean (0 + 0 + 1)/3 = 1/3, a 0 sees (1 + 0 + 1)/3 = 2/3
    out = rloo_advantages(t([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0]), 4)
    assert out.tolist() == pytest.approx([2 / 3, -2 / 3, -2 / 3, 2 / 3, 0, 0, 0, 0], abs=1e-15)
    group = rloo_advantages(t([1.0, 0.0, 0.0, 1.0]), 4, "group")
    assert group[0].item() == pytest.approx((2 / 3) / (math.sqrt(1 / 3) + 1e-4), rel=1e-14)


def rloo_reference(rewards: list[float], g: int, scale: str) -> list[float]:
    out = []
    for k in range(len(rewards) // g):
        group = rewards[k * g : (k + 1) * g]
        for i, r in enumerate(group):
            others = [x for j, x in enumerate(group) if j != i]
            a = r - sum(others) / (g - 1)
            if scale == "group":
                a /= stdev(group) + 1e-4
            elif scale == "batch":
                a /= stdev(rewards) + 1e-4
            out.append(a)
    return out


@pytest.mark.parametrize("scale", ["none", "group", "batch"])
@pytest.mark.parametrize("g", [2, 3, 5])
def test_rloo_matches_the_paper_and_sums_to_zero_in_every_group(scale, g):
    rewards = random_rewards(g, groups=6, g=g)
    out = rloo_advantages(rewards, g, scale)
    assert out.tolist() == pytest.approx(rloo_reference(rewards.tolist(), g, scale), rel=1e-12, abs=1e-12)
    assert out.view(-1, g).sum(1).abs().max().item() < 1e-12


def test_rloo_is_grpos_centring_scaled_by_g_over_g_minus_1():
    rewards = random_rewards(7)
    torch.testing.assert_close(rloo_advantages(rewards, 4), group_advantages(rewards, 4, "none") * 4 / 3)


# -- REINFORCE++ with its group baseline (Hu, 2025), normalised over the global batch -----------------
def test_reinforce_plus_plus_hand_checked():
    # groups [1, 0] and [3, 3]: centred [0.5, −0.5, 0, 0]; their batch std (n − 1 = 3) is sqrt(0.5 / 3)
    out = reinforce_plus_plus_advantages(t([1.0, 0.0, 3.0, 3.0]), 2)
    std = math.sqrt(0.5 / 3)
    assert out.tolist() == pytest.approx([0.5 / (std + 1e-4), -0.5 / (std + 1e-4), 0.0, 0.0], rel=1e-14)


def reinforce_plus_plus_reference(rewards: list[float], g: int) -> list[float]:
    """The paper's steps: subtract the group mean, then whiten over the whole batch (mean and std)."""
    centred = []
    for k in range(len(rewards) // g):
        group = rewards[k * g : (k + 1) * g]
        centred += [r - sum(group) / g for r in group]
    mean = sum(centred) / len(centred)
    return [(c - mean) / (stdev(centred) + 1e-4) for c in centred]


@pytest.mark.parametrize("g", [2, 4])
def test_reinforce_plus_plus_matches_the_paper_on_random_rewards(g):
    rewards = random_rewards(11 + g, groups=7, g=g) * 3 + 1
    out = reinforce_plus_plus_advantages(rewards, g)
    expected = reinforce_plus_plus_reference(rewards.tolist(), g)
    assert out.tolist() == pytest.approx(expected, rel=1e-12, abs=1e-12)
    assert out.std().item() == pytest.approx(1.0, rel=1e-3)  # unit std over the batch (up to eps)


def test_reinforce_plus_plus_on_one_process_share_uses_the_whole_batch():
    rewards = random_rewards(3, groups=6)
    whole = reinforce_plus_plus_advantages(rewards, 4)
    shares = [reinforce_plus_plus_advantages(part, 4, batch_rewards=rewards) for part in rewards.split(12)]
    torch.testing.assert_close(torch.cat(shares), whole, rtol=0, atol=1e-15)


def test_reinforce_plus_plus_other_scalings():
    rewards = random_rewards(5)
    torch.testing.assert_close(
        reinforce_plus_plus_advantages(rewards, 4, "group"), group_advantages(rewards, 4, "group")
    )
    torch.testing.assert_close(reinforce_plus_plus_advantages(rewards, 4, "none"), group_advantages(rewards, 4, "none"))


def test_estimate_advantages_takes_each_estimators_own_scaling_by_default():
    rewards = random_rewards(9)
    assert DEFAULT_SCALE_REWARDS.items() >= {"grpo": "group", "rloo": "none", "reinforce_plus_plus": "batch"}.items()
    assert torch.equal(estimate_advantages(rewards, 4), group_advantages(rewards, 4, "group"))  # today's, bit for bit
    assert torch.equal(estimate_advantages(rewards, 4, "rloo"), rloo_advantages(rewards, 4, "none"))
    assert torch.equal(
        estimate_advantages(rewards, 4, "reinforce_plus_plus"), reinforce_plus_plus_advantages(rewards, 4, "batch")
    )
    assert torch.equal(estimate_advantages(rewards, 4, "rloo", "batch"), rloo_advantages(rewards, 4, "batch"))
    with pytest.raises(ValueError, match="advantage_estimator must be one of"):
        estimate_advantages(rewards, 4, "ppo")
    with pytest.raises(ValueError, match="scale_rewards must be one of"):
        estimate_advantages(rewards, 4, "rloo", "median")


# -- a user's own estimator: one function of AdvantageInputs, named by dotted path ---------------------
LENGTH_WEIGHTED = """
def length_weighted(x, power=1.0):
    \"\"\"OPO's baseline (Hao et al., 2025, arXiv:2505.23585): the group's rewards averaged with weights
    |y|^power (OPO: power 1), each completion's reward minus it.\"\"\"
    g = x.grouped
    w = x.lengths.view(-1, x.num_generations).to(g.dtype) ** power
    return (g - (w * g).sum(1, keepdim=True) / w.sum(1, keepdim=True)).view(-1)
"""


@pytest.fixture
def own_estimator(tmp_path, monkeypatch) -> str:
    """The dotted path of a module of the user's holding LENGTH_WEIGHTED; the registry is restored after."""
    (tmp_path / "my_advantages.py").write_text(textwrap.dedent(LENGTH_WEIGHTED))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "my_advantages", raising=False)
    monkeypatch.setattr(ADVANTAGES, "_entries", dict(ADVANTAGES._entries))
    return "my_advantages.length_weighted"


def test_a_users_own_estimator_reads_the_lengths_by_dotted_path_or_target(own_estimator):
    rewards, lengths = t([1.0, 0.0, 0.0, 1.0, 3.0, 1.0, 1.0, 1.0]), torch.tensor([2, 6, 4, 4, 1, 1, 1, 1])
    out = estimate_advantages(rewards, 4, own_estimator, lengths=lengths)
    # group 1: baseline (2·1 + 4·1) / 16 = 0.375; group 2: equal lengths, the plain mean 1.5
    assert out.tolist() == pytest.approx([0.625, -0.375, -0.375, 0.625, 1.5, -0.5, -0.5, -0.5], abs=1e-15)
    squared = estimate_advantages(rewards, 4, {"_target_": own_estimator, "power": 2.0}, lengths=lengths)
    assert squared[0].item() == pytest.approx(1 - (4 + 16) / (4 + 36 + 16 + 16), abs=1e-15)  # weights 4, 36, 16, 16
    assert ADVANTAGES[own_estimator].scale_rewards == "group"  # the registry's default (the function ignores it)
    with pytest.raises(ConfigError, match="'my_advantages' has no 'nothing'"):
        estimate_advantages(rewards, 4, "my_advantages.nothing")


def test_every_estimator_sees_the_inputs_record_the_rollout_gives(monkeypatch):
    monkeypatch.setattr(ADVANTAGES, "_entries", dict(ADVANTAGES._entries))  # restored after the test
    seen = {}
    ADVANTAGES.add("spy", lambda x: seen.setdefault("x", x).rewards * 0)
    lengths, logprobs, mask = torch.tensor([3, 1]), torch.zeros(2, 3), torch.ones(2, 3)
    estimate_advantages(t([1.0, 2.0]), 2, "spy", None, lengths=lengths, logprobs=logprobs, mask=mask)
    x = seen["x"]
    assert isinstance(x, AdvantageInputs) and x.scale_rewards == "group" and x.eps == 1e-4
    assert x.lengths is lengths and x.logprobs is logprobs and x.mask is mask and torch.equal(x.everyone, x.rewards)


# -- the KL as a reward penalty (kl_in_reward) ----------------------------------------------------
def test_kl_reward_penalty_hand_checked():
    old = t([[-1.0, -2.0, -0.5], [-0.2, -0.3, -0.4]])
    ref = t([[-1.5, -1.0, -9.0], [-0.2, -0.1, -0.4]])
    mask = t([[1, 1, 0], [1, 1, 1]])  # the first completion has 2 tokens: its third position is ignored
    penalty, kl = kl_reward_penalty(old, ref, mask, beta=0.1)
    # k1 per token: [0.5, −1.0] and [0.0, −0.2, 0.0]; sums −0.5 and −0.2; token mean −0.7 / 5
    assert penalty.tolist() == pytest.approx([-0.05, -0.02], abs=1e-15)
    assert kl.item() == pytest.approx(-0.7 / 5, abs=1e-15)
    # the return each estimator sees: reward − β·Σ k1, e.g. reward 1 becomes 1.05
    assert (t([1.0, 0.0]) - penalty).tolist() == pytest.approx([1.05, 0.02])


def test_kl_reward_penalty_random_against_a_loop():
    gen = torch.Generator().manual_seed(0)
    old, ref = (
        -torch.rand(4, 6, generator=gen, dtype=torch.float64),
        -torch.rand(4, 6, generator=gen, dtype=torch.float64),
    )
    lengths = [6, 1, 3, 0]
    mask = t([[1.0] * k + [0.0] * (6 - k) for k in lengths])
    penalty, kl = kl_reward_penalty(old, ref, mask, beta=0.3)
    sums = [sum(old[i, j].item() - ref[i, j].item() for j in range(lengths[i])) for i in range(4)]
    assert penalty.tolist() == pytest.approx([0.3 * s for s in sums], rel=1e-12, abs=1e-15)
    assert kl.item() == pytest.approx(sum(sums) / sum(lengths), rel=1e-12)


# -- DAPO's overlong reward shaping (Yu et al., 2025, eq. 13) -------------------------------------
def test_soft_overlong_hand_checked():
    # L_max 10, L_cache 4: no penalty through 6 tokens, −1/4 per token after, −1 from 10 on
    out = soft_overlong_penalty(torch.tensor([0, 6, 7, 8, 9, 10, 11, 40]), 10, 4)
    assert out.dtype == torch.float64
    assert out.tolist() == [0.0, 0.0, -0.25, -0.5, -0.75, -1.0, -1.0, -1.0]


def test_soft_overlong_random_against_the_paper():
    gen = torch.Generator().manual_seed(1)
    lengths = torch.randint(0, 80, (200,), generator=gen)
    out = soft_overlong_penalty(lengths, 64, 16).tolist()
    for n, value in zip(lengths.tolist(), out):
        if n <= 64 - 16:
            expected = 0.0
        elif n <= 64:
            expected = ((64 - 16) - n) / 16
        else:
            expected = -1.0
        assert value == pytest.approx(expected, abs=1e-15)


@pytest.mark.parametrize(("max_length", "cache"), [(10, 0), (10, 11)])
def test_soft_overlong_refuses_a_window_outside_the_length(max_length, cache):
    with pytest.raises(ValueError, match="0 < cache_length <= max_length"):
        soft_overlong_penalty(torch.tensor([3]), max_length, cache)
