"""GRPO's variants against float64 references written from their papers: sequence-level importance
ratios (GSPO and GSPO-token), the CISPO and SAPO objectives, two-sided clipping (delta), training on
the high-entropy tokens only (top_entropy_quantile) and the entropy bonus (entropy_coef)."""

from __future__ import annotations

import math

import pytest
import torch

from alignlab.losses.grpo import (
    CLIP_LOSS_TYPES,
    GRPO_LOSS_TYPES,
    GRPO_LOSSES,
    GRPO_OBJECTIVES,
    ObjectiveSettings,
    entropy_threshold,
    grpo_loss,
    high_entropy_mask,
    importance_weights,
)
from alignlab.losses.ppo import clipped_objective


def t(rows):
    return torch.tensor(rows, dtype=torch.float64)


def sigmoid(x):
    return 1 / (1 + math.exp(-x))


def random_batch(seed: int, lengths=(5, 1, 3, 4, 2, 5), spread: float = 0.3):
    """(logp, old, ref, adv, entropy, mask) of len(lengths) completions of up to 5 tokens, float64."""
    g = torch.Generator().manual_seed(seed)
    n, r = len(lengths), max(lengths)
    logp = -torch.rand(n, r, generator=g, dtype=torch.float64) * 3
    old = logp + torch.randn(n, r, generator=g, dtype=torch.float64) * spread
    ref = logp + torch.randn(n, r, generator=g, dtype=torch.float64) * spread
    adv = torch.randn(n, generator=g, dtype=torch.float64)
    entropy = torch.rand(n, r, generator=g, dtype=torch.float64) * 2
    mask = t([[1.0] * k + [0.0] * (r - k) for k in lengths])
    return logp, old, ref, adv, entropy, mask


def aggregate(per: list[list[float]], loss_type: str, max_completion_length: int = 8) -> float:
    """Each loss type's mean of per-token losses `per` (one list per completion, its tokens only)."""
    if loss_type in ("grpo", "sapo"):
        return sum(sum(row) / len(row) for row in per if row) / len(per)
    if loss_type in ("bnpo", "dapo", "cispo"):
        return sum(map(sum, per)) / sum(map(len, per))
    return sum(map(sum, per)) / (len(per) * max_completion_length)  # dr_grpo


def clip_term(ratio: float, adv: float, eps_low: float, eps_high: float) -> float:
    return -min(ratio * adv, min(max(ratio, 1 - eps_low), 1 + eps_high) * adv)


# -- importance_sampling_level: token, sequence (GSPO), sequence_token (GSPO-token) ---------------------------
def test_importance_weights_hand_checked():
    logp, old = t([[-1.0, -2.0, -3.0], [-0.5, -1.0, -1.0]]), t([[-1.5, -2.0, -2.5], [-0.2, -1.0, -1.0]])
    mask = t([[1, 1, 0], [0, 0, 0]])  # the second completion has no tokens
    token = importance_weights(logp, old, mask, "token")
    assert token[0].tolist() == pytest.approx([math.exp(0.5), 1.0, math.exp(-0.5)], rel=1e-15)
    sequence = importance_weights(logp, old, mask, "sequence")
    # s = exp(mean over the completion's tokens of log π − log π_old) = exp((0.5 + 0) / 2); no tokens: 1
    assert sequence.shape == (2, 1)
    assert sequence[:, 0].tolist() == pytest.approx([math.exp(0.25), 1.0], rel=1e-15)
    per_token = importance_weights(logp, old, mask, "sequence_token")
    assert per_token.shape == (2, 3)
    assert per_token[0].tolist() == pytest.approx([math.exp(0.25)] * 3, rel=1e-15)
    with pytest.raises(ValueError, match="importance_sampling_level must be one of"):
        importance_weights(logp, old, mask, "sentence")


def test_sequence_ratio_is_the_geometric_mean_token_ratio():
    logp, old, _, _, _, mask = random_batch(1)
    lengths = mask.sum(1).int().tolist()
    s = importance_weights(logp, old, mask, "sequence")[:, 0]
    for i, k in enumerate(lengths):
        product = math.prod(math.exp(logp[i, j] - old[i, j]) for j in range(k))  # (π(y|x)/π_old(y|x))^(1/|y|)
        assert s[i].item() == pytest.approx(product ** (1 / k), rel=1e-12)
        assert importance_weights(logp, old, mask, "sequence_token")[i].tolist() == pytest.approx([s[i].item()] * 5)


@pytest.mark.parametrize("loss_type", CLIP_LOSS_TYPES)
def test_sequence_ratio_on_policy_is_one_and_gives_the_token_level_gradient(loss_type):
    """The issue's check. With num_iterations=1 the update's π_old is π detached: s_i = 1 exactly, and
    for every clipped loss type the gradient of `sequence` (and `sequence_token`) equals token-level
    GRPO's with the same aggregation. With loss_type=grpo (each completion's token mean, then the mean
    over completions: GSPO's −1/G·Σ_i s_i·A_i) that gradient is −A_i / (N·|y_i|) on each token of
    completion i: ∂s_i/∂log π_t = s_i/|y_i|."""
    logp, _, _, adv, _, mask = random_batch(2)
    n, lengths = mask.shape[0], mask.sum(1)
    grads = {}
    for level in ("token", "sequence", "sequence_token"):
        x = logp.clone().requires_grad_(True)
        assert (importance_weights(x, x.detach(), mask, level) == 1.0).all()  # exactly 1, not nearly
        out = grpo_loss(x, x.detach(), adv, mask, loss_type=loss_type, importance_sampling_level=level)
        out.loss.backward()
        grads[level] = x.grad
        assert out.clip_low.item() == out.clip_high.item() == 0.0
    torch.testing.assert_close(grads["sequence"], grads["token"], rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(grads["sequence_token"], grads["token"], rtol=1e-12, atol=1e-15)
    if loss_type == "grpo":
        expected = -adv.unsqueeze(1) / (n * lengths.unsqueeze(1)) * mask
        torch.testing.assert_close(grads["sequence"], expected, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("loss_type", CLIP_LOSS_TYPES)
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_gspo_loss_matches_reference(loss_type, beta):
    """GSPO (Zheng et al., 2025, eq. 5): each completion's −min(s_i·A_i, clip(s_i, 1−ε, 1+ε_high)·A_i)
    on every one of its tokens (+ β·k3 per token), aggregated by loss_type; clip shares count completions."""
    logp, old, ref, adv, _, mask = random_batch(3, spread=0.4)
    lengths = mask.sum(1).int().tolist()
    eps, high = 0.05, 0.08  # GSPO's ratios stay near 1: its paper's ε are small (3e-4, 4e-4)
    out = grpo_loss(
        logp, old, adv, mask, eps, high, beta, ref, loss_type, max_completion_length=8,
        importance_sampling_level="sequence",
    )  # fmt: skip
    per, low, up = [], 0, 0
    for i, k in enumerate(lengths):
        s = math.exp(sum(logp[i, j].item() - old[i, j].item() for j in range(k)) / k)
        low, up = low + (s < 1 - eps and adv[i] < 0), up + (s > 1 + high and adv[i] > 0)
        row = []
        for j in range(k):
            d = ref[i, j].item() - logp[i, j].item()
            row.append(clip_term(s, adv[i].item(), eps, high) + beta * (math.exp(d) - d - 1))
        per.append(row)
    assert out.loss.item() == pytest.approx(aggregate(per, loss_type), rel=1e-12)
    assert low + up > 0  # some completions are clipped: the test covers the clip
    assert out.clip_low.item() == pytest.approx(low / len(lengths))
    assert out.clip_high.item() == pytest.approx(up / len(lengths))
    assert out.clip_units.item() == len(lengths)


def test_gspo_token_is_gspo_when_a_completion_shares_one_advantage():
    """GSPO-token (eq. 13) has GSPO's value and, with one advantage per completion, its gradient
    (eqs. 11 and 18), off-policy and with clipped completions, under the sequence-mean aggregation."""
    logp, old, _, adv, _, mask = random_batch(4, spread=0.4)
    out = {}
    for level in ("sequence", "sequence_token"):
        x = logp.clone().requires_grad_(True)
        loss = grpo_loss(x, old, adv, mask, 0.05, 0.08, loss_type="grpo", importance_sampling_level=level)
        loss.loss.backward()
        out[level] = (loss.loss.item(), x.grad, loss.clip_low + loss.clip_high)
    assert out["sequence_token"][0] == pytest.approx(out["sequence"][0], rel=1e-12)
    torch.testing.assert_close(out["sequence_token"][1], out["sequence"][1], rtol=1e-12, atol=1e-15)
    assert out["sequence"][2] > 0  # some completions are clipped


# -- loss_type cispo (MiniMax-M1) -----------------------------------------------------------------------------
def test_cispo_hand_checked():
    """−sg[min(ρ, ε_high)]·A·log π, token mean: ρ = e^0.5 is capped at 1.2, ρ = e^−0.5 is not (no lower
    bound); the gradient is the capped weight times −A over the step's 2 tokens."""
    logp = t([[-1.0, -2.0]]).requires_grad_(True)
    old = t([[-1.5, -1.5]])
    out = grpo_loss(logp, old, t([2.0]), t([[1, 1]]), epsilon_high=1.2, loss_type="cispo")
    w = math.exp(-0.5)
    assert out.loss.item() == pytest.approx((1.2 * 2 * 1.0 + w * 2 * 2.0) / 2, rel=1e-14)
    out.loss.backward()
    assert logp.grad.tolist() == [pytest.approx([-1.2 * 2 / 2, -w * 2 / 2], rel=1e-14)]
    assert out.cispo_clip.item() == 0.5 and out.clip_low is None and out.clip_high is None


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_cispo_matches_reference(level):
    logp, old, _, adv, _, mask = random_batch(5, spread=0.5)
    lengths = mask.sum(1).int().tolist()
    x = logp.clone().requires_grad_(True)
    out = grpo_loss(x, old, adv, mask, epsilon_high=1.3, loss_type="cispo", importance_sampling_level=level)
    out.loss.backward()
    per, grad, capped = [], torch.zeros_like(logp), 0
    for i, k in enumerate(lengths):
        s = math.exp(sum(logp[i, j].item() - old[i, j].item() for j in range(k)) / k)
        row = []
        for j in range(k):
            ratio = math.exp(logp[i, j].item() - old[i, j].item()) if level == "token" else s
            row.append(-min(ratio, 1.3) * adv[i].item() * logp[i, j].item())
            grad[i, j] = -min(ratio, 1.3) * adv[i].item() / sum(lengths)  # the weight has no gradient
            capped += level == "token" and ratio > 1.3 and adv[i] > 0
        capped += level == "sequence" and s > 1.3 and adv[i] > 0
        per.append(row)
    assert out.loss.item() == pytest.approx(aggregate(per, "cispo"), rel=1e-12)
    torch.testing.assert_close(x.grad, grad, rtol=1e-12, atol=1e-15)
    assert capped > 0
    assert out.cispo_clip.item() == pytest.approx(capped / (sum(lengths) if level == "token" else len(lengths)))


# -- loss_type sapo (SAPO) ------------------------------------------------------------------------------------
def test_sapo_hand_checked():
    """At ρ = 1 the gate is σ(0)·4/τ = 2/τ and its gradient A (GRPO's on-policy gradient); τ_neg for A ≤ 0."""
    logp = t([[-1.0, -2.0], [-0.5, -0.7]]).requires_grad_(True)
    adv, mask = t([1.0, -1.0]), t([[1, 1], [1, 0]])
    out = grpo_loss(logp, logp.detach(), adv, mask, loss_type="sapo", sapo_temperature_neg=1.05)
    # completion means: −2·1/1 and +2·1/1.05; then the mean over the 2 completions
    assert out.loss.item() == pytest.approx((-2.0 + 2 / 1.05) / 2, rel=1e-14)
    out.loss.backward()
    # −A / (N·|y_i|): −1/(2·2) on completion 1, +1/(2·1) on completion 2
    assert logp.grad.tolist() == [pytest.approx([-0.25, -0.25]), pytest.approx([0.5, 0.0])]
    assert out.clip_low is None and out.cispo_clip is None


@pytest.mark.parametrize(("tau_pos", "tau_neg"), [(1.0, 1.05), (0.5, 3.0)])
def test_sapo_matches_reference(tau_pos, tau_neg):
    """−(4/τ)·σ(τ(ρ−1))·A per token, each completion's token mean averaged; the gradient per token is
    −4·σ·(1−σ)·ρ·A / (N·|y_i|)."""
    logp, old, _, adv, _, mask = random_batch(6, spread=0.5)
    lengths = mask.sum(1).int().tolist()
    x = logp.clone().requires_grad_(True)
    out = grpo_loss(x, old, adv, mask, loss_type="sapo", sapo_temperature_pos=tau_pos, sapo_temperature_neg=tau_neg)
    out.loss.backward()
    per, grad = [], torch.zeros_like(logp)
    for i, k in enumerate(lengths):
        a = adv[i].item()
        tau = tau_pos if a > 0 else tau_neg
        row = []
        for j in range(k):
            ratio = math.exp(logp[i, j].item() - old[i, j].item())
            gate = sigmoid(tau * (ratio - 1))
            row.append(-4 / tau * gate * a)
            grad[i, j] = -4 * gate * (1 - gate) * ratio * a / (len(lengths) * k)
        per.append(row)
    assert out.loss.item() == pytest.approx(aggregate(per, "sapo"), rel=1e-12)
    torch.testing.assert_close(x.grad, grad, rtol=1e-10, atol=1e-15)


# -- delta: two-sided clipping ----------------------------------------------------------------------------------
def test_delta_hand_checked():
    """ρ = e ≈ 2.718, ε = 0.2, δ = 1.5: for A = −1, −min(ρ·A, 1.2·A) = ρ becomes −min(δ·A, 1.2·A) = δ;
    for A = +1 the clipped term −1.2 is the loss with or without δ."""
    logp, old, mask = t([[0.0], [0.0]]), t([[-1.0], [-1.0]]), t([[1], [1]])
    plain = grpo_loss(logp, old, t([-1.0, 1.0]), mask, loss_type="grpo").per_token[:, 0].tolist()
    capped = grpo_loss(logp, old, t([-1.0, 1.0]), mask, loss_type="grpo", delta=1.5).per_token[:, 0].tolist()
    assert plain == pytest.approx([math.e, -1.2]) and capped == pytest.approx([1.5, -1.2])


@pytest.mark.parametrize("loss_type", CLIP_LOSS_TYPES)
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_delta_clamps_only_negative_advantage_tokens(loss_type, level):
    logp, old, _, adv, _, mask = random_batch(7, lengths=(1, 2, 1, 3, 2, 1, 2, 1, 3, 1, 2, 1), spread=1.0)
    args = dict(epsilon=0.2, epsilon_high=0.28, loss_type=loss_type, max_completion_length=8)
    plain = grpo_loss(logp, old, adv, mask, importance_sampling_level=level, **args)
    capped = grpo_loss(logp, old, adv, mask, importance_sampling_level=level, delta=1.5, **args)
    ratio = importance_weights(logp, old, mask, level).expand_as(logp)
    a = adv.unsqueeze(1).expand_as(logp)
    changed = (capped.per_token != plain.per_token) & (mask > 0)
    assert changed.any() and (a[changed] < 0).all() and (ratio[changed] > 1.5).all()
    # where it changes, the reference's −min(min(ρ, δ)·A, clip(ρ)·A) = −δ·A (A < 0, ρ > δ > 1 + ε_high)
    torch.testing.assert_close(capped.per_token[changed], -1.5 * a[changed], rtol=1e-14, atol=0)
    assert ((a > 0) & (ratio > 1.5) & (mask > 0)).any()  # tokens with A > 0 beyond δ: left as they were
    assert capped.clip_low.item() == plain.clip_low.item() and capped.clip_high.item() == plain.clip_high.item()


# -- top_entropy_quantile ----------------------------------------------------------------------------------------
def test_entropy_threshold_hand_checked():
    entropy, mask = t([[0.1, 0.5, 0.9, 0.3, 5.0]]), t([[1, 1, 1, 1, 0]])  # 5.0 is not a completion token
    # sorted kept entropies 0.1 0.3 0.5 0.9: the 0.5-quantile sits halfway between 0.3 and 0.5
    assert entropy_threshold(entropy, mask, 0.5).item() == pytest.approx(0.4)
    assert high_entropy_mask(entropy, mask, entropy_threshold(entropy, mask, 0.5)).tolist() == [[0, 1, 1, 0, 0]]
    # top 25%: the 0.75-quantile, a quarter of the way from 0.5 to 0.9
    assert entropy_threshold(entropy, mask, 0.25).item() == pytest.approx(0.6)
    assert high_entropy_mask(entropy, mask, entropy_threshold(entropy, mask, 0.0)).tolist() == [[0, 0, 1, 0, 0]]
    assert high_entropy_mask(entropy, mask, entropy_threshold(entropy, mask, 1.0)).tolist() == [[1, 1, 1, 1, 0]]
    assert entropy_threshold(entropy, mask * 0, 0.2).item() == math.inf  # no tokens: none kept


@pytest.mark.parametrize("q", [0.0, 0.2, 0.37, 0.5, 0.8, 1.0])
def test_entropy_threshold_is_torch_quantile(q):
    _, _, _, _, entropy, mask = random_batch(8)
    expected = torch.quantile(entropy[mask.bool()], 1 - q)
    assert entropy_threshold(entropy, mask, q).item() == pytest.approx(expected.item(), rel=1e-14)
    kept = high_entropy_mask(entropy, mask, entropy_threshold(entropy, mask, q))
    # distinct values: the tokens at or above the (1 − q)-quantile of n are ⌊q·(n − 1)⌋ + 1 of them
    assert kept.sum().item() == math.floor(q * (mask.sum().item() - 1)) + 1


@pytest.mark.parametrize("loss_type", GRPO_LOSS_TYPES)
def test_top_entropy_quantile_one_is_todays_loss(loss_type):
    """top_entropy_quantile = 1.0 keeps every completion token: the loss, its per-token values and its
    gradient are bit-identical to the loss without an entropy mask (the update skips the mask then)."""
    logp, old, ref, adv, entropy, mask = random_batch(9)
    keep = high_entropy_mask(entropy, mask, entropy_threshold(entropy, mask, 1.0))
    assert torch.equal(keep, mask)
    outs = []
    for entropy_mask in (None, keep):
        x = logp.clone().requires_grad_(True)
        out = grpo_loss(x, old, adv, mask, 0.2, 5.0 if loss_type == "cispo" else 0.28, 0.04, ref, loss_type, 8,
                        entropy_mask=entropy_mask)  # fmt: skip
        out.loss.backward()
        outs.append((out.loss, out.per_token, x.grad))
    for a, b in zip(*outs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("loss_type", GRPO_LOSS_TYPES)
def test_entropy_mask_and_bonus_match_reference(loss_type):
    """The policy term and the entropy bonus on the kept tokens only, the KL on every token, averaged by
    loss_type over all completion tokens (TRL multiplies the per-token loss by the entropy mask);
    the bonus's gradient in H is −entropy_coef times each kept token's aggregation weight."""
    logp, old, ref, adv, entropy, mask = random_batch(10)
    lengths = mask.sum(1).int().tolist()
    keep = high_entropy_mask(entropy, mask, entropy_threshold(entropy, mask, 0.4))
    assert 0 < keep.sum() < mask.sum()
    h = entropy.clone().requires_grad_(True)
    high, coef, beta = (1.5 if loss_type == "cispo" else 0.28), 0.1, 0.04
    out = grpo_loss(logp, old, adv, mask, 0.2, high, beta, ref, loss_type, 8,
                    entropy=h, entropy_coef=coef, entropy_mask=keep)  # fmt: skip
    out.loss.backward()
    per, weight = [], torch.zeros_like(logp)
    for i, k in enumerate(lengths):
        a, row = adv[i].item(), []
        for j in range(k):
            ratio = math.exp(logp[i, j].item() - old[i, j].item())
            if loss_type == "cispo":
                policy = -min(ratio, high) * a * logp[i, j].item()
            elif loss_type == "sapo":
                tau = 1.0 if a > 0 else 1.05
                policy = -4 / tau * sigmoid(tau * (ratio - 1)) * a
            else:
                policy = clip_term(ratio, a, 0.2, high)
            d = ref[i, j].item() - logp[i, j].item()
            row.append(keep[i, j].item() * (policy - coef * entropy[i, j].item()) + beta * (math.exp(d) - d - 1))
            if loss_type in ("grpo", "sapo"):
                weight[i, j] = 1 / (len(lengths) * k)
            elif loss_type == "dr_grpo":
                weight[i, j] = 1 / (len(lengths) * 8)
            else:
                weight[i, j] = 1 / sum(lengths)
        per.append(row)
    assert out.loss.item() == pytest.approx(aggregate(per, loss_type), rel=1e-12)
    torch.testing.assert_close(h.grad, -coef * weight * keep, rtol=1e-12, atol=1e-16)
    assert out.entropy.item() == pytest.approx((entropy * mask).sum().item() / mask.sum().item(), rel=1e-14)


def test_entropy_bonus_hand_checked():
    """dapo: (−A·ρ − c·H) summed over the 3 tokens / 3, at ρ = 1: (−2·3 − 0.5·(1 + 2 + 3)) / 3."""
    logp = t([[-1.0, -2.0, -3.0]])
    out = grpo_loss(logp, logp, t([2.0]), t([[1, 1, 1]]), entropy=t([[1.0, 2.0, 3.0]]), entropy_coef=0.5)
    assert out.loss.item() == pytest.approx((-6.0 - 3.0) / 3, rel=1e-15)
    assert out.entropy.item() == pytest.approx(2.0)
    with pytest.raises(ValueError, match="entropy_coef needs the policy's per-token entropy"):
        grpo_loss(logp, logp, t([2.0]), t([[1, 1, 1]]), entropy_coef=0.5)


# -- every variant: a step cut into micro-batches is the whole step ----------------------------------------------
@pytest.mark.parametrize("loss_type", GRPO_LOSS_TYPES)
@pytest.mark.parametrize("level", ["sequence", "sequence_token"])
def test_variants_split_into_micro_batches_give_the_whole_step(loss_type, level):
    logp, old, ref, adv, entropy, mask = random_batch(11)
    keep = high_entropy_mask(entropy, mask, entropy_threshold(entropy, mask, 0.5))  # over the whole step
    args = dict(epsilon=0.2, epsilon_high=1.5 if loss_type == "cispo" else 0.28, beta=0.04, loss_type=loss_type,
                max_completion_length=8, importance_sampling_level=level, entropy_coef=0.05)  # fmt: skip
    if loss_type in CLIP_LOSS_TYPES:
        args["delta"] = 1.6
    whole = grpo_loss(logp, old, adv, mask, ref_logprobs=ref, entropy=entropy, entropy_mask=keep, **args).loss
    cuts, scale = [slice(0, 1), slice(1, 4), slice(4, 6)], 3.0
    parts = sum(
        grpo_loss(logp[c], old[c], adv[c], mask[c], ref_logprobs=ref[c], entropy=entropy[c], entropy_mask=keep[c],
                  num_items_in_batch=mask.sum(), num_completions=6, scale=scale, **args).loss / scale
        for c in cuts
    )  # fmt: skip
    assert parts.item() == pytest.approx(whole.item(), rel=1e-13)


# -- the registry: a loss type is an objective and an aggregation -------------------------------------
def test_each_loss_type_is_an_objective_and_an_aggregation():
    assert GRPO_LOSS_TYPES == ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo")
    assert CLIP_LOSS_TYPES == GRPO_LOSSES.names(objective="clipped") == ("grpo", "bnpo", "dr_grpo", "dapo")
    assert {name: GRPO_LOSSES[name].objective for name in ("cispo", "sapo")} == {"cispo": "cispo", "sapo": "sapo"}
    same = {name: GRPO_LOSSES[name].fn for name in GRPO_LOSS_TYPES}  # grpo's row mean, dapo's token mean
    assert same["grpo"] is same["sapo"] and same["bnpo"] is same["dapo"] is same["cispo"]
    assert same["dr_grpo"] not in (same["grpo"], same["dapo"]) and same["grpo"] is not same["dapo"]
    assert set(GRPO_OBJECTIVES.names()) == {GRPO_LOSSES[name].objective for name in GRPO_LOSS_TYPES}


def test_grpos_clipped_objective_is_ppos_clipped_surrogate_bit_for_bit():
    """−min(ρA, clip(ρ)·A) (GRPO's spelling) and max(−Aρ, −A·clip(ρ)) (PPO's) are one function: equal to
    the bit, values and gradients (negation is exact)."""
    g = torch.Generator().manual_seed(5)
    logp, old = torch.randn(6, 9, generator=g), torch.randn(6, 9, generator=g)
    adv = torch.randn(6, 1, generator=g)
    for high in (0.2, 0.28):
        logp_a, logp_b = logp.clone().requires_grad_(True), logp.clone().requires_grad_(True)
        ratio_a, ratio_b = torch.exp(logp_a - old), torch.exp(logp_b - old)
        shared = GRPO_OBJECTIVES["clipped"].fn(ratio_a, adv, logp_a, ObjectiveSettings(0.2, high))
        ppo = torch.max(-adv * ratio_b, -adv * torch.clamp(ratio_b, 1 - 0.2, 1 + high))
        assert torch.equal(shared, ppo) and torch.equal(shared, clipped_objective(ratio_b, adv, 0.2, high))
        shared.sum().backward()
        ppo.sum().backward()
        assert torch.equal(logp_a.grad, logp_b.grad)
