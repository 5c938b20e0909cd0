"""GRPO: group-relative advantages and the clipped, optionally KL-regularised token loss, with its
variants: sequence-level importance ratios (GSPO), CISPO and SAPO objectives, two-sided clipping,
training on the high-entropy tokens only, and an entropy bonus."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from alignlab.losses.ppo import clipped_objective
from alignlab.losses.reduction import masked_mean, step_mean
from alignlab.losses.rlhf import kl_estimate, kl_loss_term
from alignlab.registry import Entry, Registry

SCALE_REWARDS = ("group", "batch", "none")


# -- advantage estimators: all per completion, [N] in and out ---------------------------
@dataclass(frozen=True)
class AdvantageInputs:
    """What an advantage estimator may read: one rollout's completions, N = B·G, in consecutive groups of
    G = `num_generations` answers to one prompt. Process-local rows, but for `batch_rewards`.

    rewards [N]: each completion's return (its reward; minus β·Σ k1 with kl_in_reward). scale_rewards:
    `group`, `batch` or `none` (scale_advantages). batch_rewards [M·G]: the whole batch's rewards (every
    process's, whole groups) when `rewards` is one process's share (None: `rewards`). lengths [N]: each
    completion's tokens. logprobs, mask [N, R]: the sampling policy's token log-probs (meaningful where mask
    is 1; None where the rollout did not compute them) and 1 on the completion tokens the loss trains
    (verl's estimators read the response mask, some the old log-probs, as these).
    """

    rewards: torch.Tensor
    num_generations: int
    scale_rewards: str = "group"
    eps: float = 1e-4
    batch_rewards: torch.Tensor | None = None
    lengths: torch.Tensor | None = None
    logprobs: torch.Tensor | None = None
    mask: torch.Tensor | None = None

    @property
    def grouped(self) -> torch.Tensor:
        """rewards as [B, G], a row a prompt."""
        return self.rewards.view(-1, self.num_generations)

    @property
    def everyone(self) -> torch.Tensor:
        """The whole batch's rewards [M·G] (batch_rewards, else rewards)."""
        return self.rewards if self.batch_rewards is None else self.batch_rewards


# An estimator is fn(AdvantageInputs) -> [N] advantages; `scale_rewards` is what it takes when
# algorithm.scale_rewards is null (ms-swift's defaults: RLOO and REINFORCE++ as their papers have them).
ADVANTAGES: Registry[Callable[..., torch.Tensor]] = Registry(
    "advantage estimator", "algorithm.advantage_estimator", scale_rewards="group"
)


def scale_advantages(
    advantages: torch.Tensor, x: AdvantageInputs, batch_std: Callable[[], torch.Tensor]
) -> torch.Tensor:
    """`advantages` [N] ÷ (the group's reward std + eps) for x.scale_rewards `group`, ÷ (batch_std() + eps)
    for `batch`, as they are for `none` (Dr. GRPO, Liu et al., 2025). Stds are unbiased (Bessel's
    correction). Raises ValueError for another scale_rewards."""
    if x.scale_rewards == "none":
        return advantages
    if x.scale_rewards == "group":
        return advantages / (x.grouped.std(1).repeat_interleave(x.num_generations) + x.eps)
    if x.scale_rewards == "batch":
        return advantages / (batch_std() + x.eps)
    raise ValueError(f"scale_rewards must be one of {SCALE_REWARDS}, got {x.scale_rewards!r}")


@ADVANTAGES.register("grpo", scale_rewards="group")
def group_mean_baseline(x: AdvantageInputs) -> torch.Tensor:
    """A_i = (r_i − mean of its group) / (std + eps) (GRPO: Shao et al., 2024, DeepSeekMath §4.1.2); the
    std the group's (`group`), the whole batch's rewards' (`batch`), or none (`none`, Dr. GRPO)."""
    centred = (x.grouped - x.grouped.mean(1, keepdim=True)).view(-1)
    return scale_advantages(centred, x, lambda: x.everyone.std())


@ADVANTAGES.register("rloo", scale_rewards="none")
def leave_one_out_baseline(x: AdvantageInputs) -> torch.Tensor:
    """REINFORCE leave-one-out (Ahmadian et al., 2024, "Back to Basics", eq. 6): A_i = r_i − (1/(G−1))·Σ_{j≠i} r_j,
    = G/(G−1)·(r_i − mean of the group); a group's advantages sum to zero; G >= 2. Scaled as ms-swift's
    `compute_advantages` combines it (`none` the paper's; `batch`: the batch's reward std). TRL's
    RLOOTrainer has `normalize_advantages` instead, which whitens the advantages over the batch."""
    baseline = (x.grouped.sum(1, keepdim=True) - x.grouped) / (x.num_generations - 1)  # the other G−1's mean
    return scale_advantages((x.grouped - baseline).view(-1), x, lambda: x.everyone.std())


@ADVANTAGES.register("reinforce_plus_plus", scale_rewards="batch")
def reinforce_plus_plus_baseline(x: AdvantageInputs) -> torch.Tensor:
    """REINFORCE++ with its group baseline (Hu, 2025, arXiv 2501.03262, "REINFORCE++-baseline"): c_i = r_i −
    mean of its group, then normalised over the WHOLE global batch, (c − mean_batch c) / (std_batch c + eps);
    every group's c sums to zero, so this is c / (std_batch c + eps): ms-swift's `reinforce_plus_plus`, per
    completion (verl's and OpenRLHF's whiten c over tokens instead, so a long completion weighs more)."""
    everyone = x.everyone.view(-1, x.num_generations)
    batch_std = lambda: (everyone - everyone.mean(1, keepdim=True)).std()  # noqa: E731  (of c over the global batch)
    return scale_advantages((x.grouped - x.grouped.mean(1, keepdim=True)).view(-1), x, batch_std)


ADVANTAGE_ESTIMATORS = ADVANTAGES.names()
DEFAULT_SCALE_REWARDS = {name: ADVANTAGES[name].scale_rewards for name in ADVANTAGES}


def estimate_advantages(
    rewards: torch.Tensor,
    num_generations: int,
    advantage_estimator: str | Mapping[str, Any] = "grpo",
    scale_rewards: str | None = None,
    batch_rewards: torch.Tensor | None = None,
    *,
    eps: float = 1e-4,
    lengths: torch.Tensor | None = None,
    logprobs: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """[N] advantages by `advantage_estimator`: a name in ADVANTAGES, or the user's own function by dotted
    path or {_target_: path, **kwargs} (fn(AdvantageInputs, **kwargs) -> [N]); `scale_rewards` None: the
    estimator's own (a user's: `group`). The other arguments: AdvantageInputs. Raises ValueError for an
    unknown name or scaling, ConfigError for a dotted path that does not import."""
    plain = isinstance(advantage_estimator, str) and "." not in advantage_estimator
    entry = ADVANTAGES.entry(advantage_estimator) if plain else ADVANTAGES.resolve(advantage_estimator)
    scale = entry.scale_rewards if scale_rewards is None else scale_rewards
    return entry.fn(AdvantageInputs(rewards, num_generations, scale, eps, batch_rewards, lengths, logprobs, mask))


def _by_position(name: str) -> Callable[..., torch.Tensor]:
    """The estimator `name` called by position (rewards, num_generations, scale_rewards, eps, batch_rewards),
    as the built-in estimators were called before the registry."""

    def advantages(
        rewards: torch.Tensor,
        num_generations: int,
        scale_rewards: str | None = None,
        eps: float = 1e-4,
        batch_rewards: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return estimate_advantages(rewards, num_generations, name, scale_rewards, batch_rewards, eps=eps)

    advantages.__doc__ = f"ADVANTAGES[{name!r}] by position: {ADVANTAGES[name].fn.__doc__}"
    return advantages


group_advantages = _by_position("grpo")
rloo_advantages = _by_position("rloo")
reinforce_plus_plus_advantages = _by_position("reinforce_plus_plus")


def kl_reward_penalty(
    old_logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor, beta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The KL to the reference as a reward penalty (`kl_in_reward`): each completion token's reward gets
    −β·k1_t, k1_t = log π_old − log π_ref (the first-order log ratio, as TRL's RLOOTrainer and ms-swift
    use; Ahmadian et al., 2024), and the estimators are outcome estimators (γ = 1): a completion's return is
    its reward plus its tokens' penalties, r_i − β·Σ_t k1_t, the value they see (verl's grpo/rloo sum the
    token-level rewards the same way).

    old_logprobs, ref_logprobs, mask [N, R] (the policy at generation time, the reference, 1 on the
    completion's tokens). Returns (the penalty β·Σ_t k1_t per completion [N] to subtract from the rewards,
    the token-mean k1 over the batch: a scalar for logging as `kl`).
    """
    mask = mask.to(old_logprobs.dtype)
    k1 = kl_estimate(old_logprobs, ref_logprobs, "k1") * mask
    return beta * k1.sum(1), k1.sum() / mask.sum().clamp(min=1)


def soft_overlong_penalty(lengths: torch.Tensor, max_length: int, cache_length: int) -> torch.Tensor:
    """DAPO's overlong reward shaping (Yu et al., 2025, eq. 13): with L_max = `max_length` and L_cache =
    `cache_length`, a completion of |y| tokens gets 0 while |y| <= L_max − L_cache, then
    ((L_max − L_cache) − |y|) / L_cache, falling linearly to −1 at L_max, and −1 beyond.

    lengths [N] completion lengths in tokens; returns [N] penalties in [−1, 0] (float64 for integer
    lengths, else their dtype). Raises ValueError unless 0 < cache_length <= max_length.
    """
    if not 0 < cache_length <= max_length:
        raise ValueError(f"soft overlong needs 0 < cache_length <= max_length, got {cache_length} and {max_length}")
    lengths = lengths if lengths.is_floating_point() else lengths.double()
    start = max_length - cache_length
    return ((start - lengths) / cache_length).clamp(min=-1.0, max=0.0)


def k3_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Per-token KL estimate (r − 1) − log r >= 0, log r = ref − log π (Schulman's k3): GRPO's default KL term,
    alignlab.losses.rlhf.kl_estimate's k3."""
    return kl_estimate(logprobs, ref_logprobs, "k3")


# -- importance ratios: fn(logprobs, old_logprobs, mask [N, R]) -> ρ, [N, R] or [N, 1] ----------
IMPORTANCE_RATIOS: Registry[Callable[..., torch.Tensor]] = Registry(
    "importance sampling level", "algorithm.importance_sampling_level"
)


def _sequence_log_ratio(logprobs: torch.Tensor, old_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[N, 1] the mean over each completion's tokens of log π − log π_old (0 for one without tokens)."""
    return masked_mean(logprobs - old_logprobs, mask, dim=1).unsqueeze(1)


@IMPORTANCE_RATIOS.register("token")
def token_ratio(logprobs: torch.Tensor, old_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """ρ_t = exp(log π_t − log π_old,t), [N, R] (GRPO)."""
    return torch.exp(logprobs - old_logprobs)


@IMPORTANCE_RATIOS.register("sequence")
def sequence_ratio(logprobs: torch.Tensor, old_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The length-normalised sequence ratio s_i = exp(mean over the completion's tokens of log π − log π_old),
    [N, 1] (1 for a completion without tokens) (GSPO, Zheng et al., 2025, arXiv:2507.18071, eq. 7)."""
    return torch.exp(_sequence_log_ratio(logprobs, old_logprobs, mask))


@IMPORTANCE_RATIOS.register("sequence_token")
def sequence_token_ratio(logprobs: torch.Tensor, old_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """sg[s_i]·π_t/sg[π_t], [N, R]: every value is s_i, the gradient s_i·∇log π_t flows through each token
    (GSPO-token, Zheng et al., 2025, eq. 13)."""
    return torch.exp(_sequence_log_ratio(logprobs, old_logprobs, mask).detach() + logprobs - logprobs.detach())


IMPORTANCE_SAMPLING_LEVELS = IMPORTANCE_RATIOS.names()


def importance_weights(
    logprobs: torch.Tensor, old_logprobs: torch.Tensor, mask: torch.Tensor, level: str = "token"
) -> torch.Tensor:
    """The importance ratio π/π_old the objective weighs each token by, at `level` (IMPORTANCE_RATIOS:
    token, sequence, sequence_token). logprobs, old_logprobs, mask: [N, R], completion tokens of N
    completions. Returns [N, R], or [N, 1] for one ratio per completion. Raises ValueError: an unknown level."""
    return IMPORTANCE_RATIOS.entry(level).fn(logprobs, old_logprobs, mask)


# -- objectives: fn(ratio, advantages [N, 1], logprobs [N, R], ObjectiveSettings) -> per-token loss ----
@dataclass(frozen=True)
class ObjectiveSettings:
    """What the objectives read besides ratio, advantages and log-probs (GRPOConfig's names): the clip range
    [1 − epsilon, 1 + epsilon_high], two-sided clipping's `delta`, SAPO's gate temperatures."""

    epsilon: float = 0.2
    epsilon_high: float = 0.2
    delta: float | None = None
    sapo_temperature_pos: float = 1.0
    sapo_temperature_neg: float = 1.05


def _clip_shares(ratio: torch.Tensor, a: torch.Tensor, s: ObjectiveSettings) -> dict[str, torch.Tensor]:
    """The clipped objective's clip regions: below (A < 0, ρ < 1 − ε_low) and above (A > 0, ρ > 1 + ε_high)."""
    return {"clip_low": (ratio < 1 - s.epsilon) & (a < 0), "clip_high": (ratio > 1 + s.epsilon_high) & (a > 0)}


def _cispo_shares(ratio: torch.Tensor, a: torch.Tensor, s: ObjectiveSettings) -> dict[str, torch.Tensor]:
    """CISPO's capped weights: A > 0 and ρ > ε_high."""
    return {"cispo_clip": (ratio > s.epsilon_high) & (a > 0)}


# `clips`: fn(ratio, advantages, settings) -> {GRPOLossOutput field: where it counts a clip unit}
GRPO_OBJECTIVES: Registry[Callable[..., torch.Tensor]] = Registry("GRPO objective", clips=None)


@GRPO_OBJECTIVES.register("clipped", clips=_clip_shares)
def clipped(ratio: torch.Tensor, a: torch.Tensor, logprobs: torch.Tensor, s: ObjectiveSettings) -> torch.Tensor:
    """PPO's clip, −min(ρ·A, clip(ρ, 1−ε, 1+ε_high)·A), with `delta` (alignlab.losses.ppo.clipped_objective)."""
    return clipped_objective(ratio, a, s.epsilon, s.epsilon_high, s.delta)


@GRPO_OBJECTIVES.register("cispo", clips=_cispo_shares)
def cispo_objective(ratio: torch.Tensor, a: torch.Tensor, logprobs: torch.Tensor, s: ObjectiveSettings) -> torch.Tensor:
    """−sg[min(ρ, ε_high)]·A·log π (CISPO, MiniMax-M1, 2025, arXiv:2506.13585, eq. 4): the importance weight is capped
    and carries no gradient, so every token keeps its policy gradient, weighted by the capped ratio.

    The cap is `epsilon_high` itself, as TRL and ms-swift read it (ScaleRL's ε_max, arXiv:2510.13786,
    which uses 5.0); MiniMax-M1's 1 + ε^IS_high is epsilon_high = 1 + ε^IS_high. There is no lower
    bound (MiniMax-M1 sets ε^IS_low large).
    """
    return -torch.clamp(ratio, max=s.epsilon_high).detach() * a * logprobs


@GRPO_OBJECTIVES.register("sapo")
def sapo_objective(ratio: torch.Tensor, a: torch.Tensor, logprobs: torch.Tensor, s: ObjectiveSettings) -> torch.Tensor:
    """−(4/τ)·σ(τ·(ρ − 1))·A (SAPO, Qwen, 2025, arXiv:2511.20347, as TRL implements it): a smooth gate of the
    ratio instead of the hard clip. Its gradient in ρ, 4·σ·(1−σ)·A, is A at ρ = 1 (GRPO's on-policy
    gradient) and fades smoothly as ρ moves away. τ = `sapo_temperature_pos` for A > 0, `sapo_temperature_neg`
    otherwise (larger: the gradient of negative-advantage tokens fades faster).
    """
    tau = torch.where(a > 0, a.new_tensor(s.sapo_temperature_pos), a.new_tensor(s.sapo_temperature_neg))
    return -torch.sigmoid(tau * (ratio - 1)) * 4 / tau * a


def entropy_threshold(entropy: torch.Tensor, mask: torch.Tensor, top_entropy_quantile: float) -> torch.Tensor:
    """The entropy at or above which a token is in the top `top_entropy_quantile` share of the tokens
    `mask` keeps: their (1 − q)-quantile, linearly interpolated as torch.quantile computes it (TRL's
    get_high_entropy_mask; Wang et al., 2025, "Beyond the 80/20 rule", arXiv:2506.01939). entropy, mask: any one shape
    (e.g. [N, R], every token of the step). Returns a detached scalar; +inf when the mask keeps none.
    Sorts instead of calling torch.quantile, which refuses inputs above 2^24 elements."""
    values = torch.sort(entropy.detach()[mask.bool()]).values
    if values.numel() == 0:
        return entropy.new_tensor(math.inf)
    position = (1 - top_entropy_quantile) * (values.numel() - 1)
    low = math.floor(position)
    high = min(low + 1, values.numel() - 1)
    return torch.lerp(values[low], values[high], position - low)


def high_entropy_mask(entropy: torch.Tensor, mask: torch.Tensor, threshold: torch.Tensor | float) -> torch.Tensor:
    """1 on the tokens of `mask` whose entropy is at least `threshold` (entropy_threshold), else 0:
    the tokens the policy loss keeps under top_entropy_quantile. entropy, mask [N, R]; in mask's dtype."""
    return mask * (entropy.detach() >= threshold).to(mask.dtype)


class GRPOLossOutput(NamedTuple):
    loss: torch.Tensor
    per_token: torch.Tensor  # [N, R] per-token loss (0 outside the mask)
    kl: torch.Tensor | None  # mean k3 KL over tokens, when a reference is given
    clip_low: torch.Tensor | None  # share of clip units with A < 0 and ρ < 1 − ε_low (clipped loss types)
    clip_high: torch.Tensor | None  # share of clip units with A > 0 and ρ > 1 + ε_high (clipped loss types)
    cispo_clip: torch.Tensor | None = None  # share of clip units with A > 0 and ρ > ε_high (cispo)
    entropy: torch.Tensor | None = None  # mean policy entropy over the mask's tokens, when given
    clip_units: torch.Tensor | None = None  # what the clip shares count: tokens, or completions (sequence ratios)


# -- loss types: an objective (GRPO_OBJECTIVES) and an aggregation, the entry's function ---------------
class StepCounts(NamedTuple):
    """The optimizer step's totals a micro-batch's loss divides by (every micro-batch and process; None:
    these rows' own), and `scale` (alignlab.losses.reduction.step_mean)."""

    tokens: float | torch.Tensor | None  # num_items_in_batch: completion tokens
    completions: float | torch.Tensor | None  # num_completions
    max_completion_length: int | None
    scale: float


# fn(per_token [N, R] (0 outside the mask), mask [N, R], StepCounts) -> the micro-batch's share of the loss
GRPO_LOSSES: Registry[Callable[..., torch.Tensor]] = Registry(
    "GRPO loss type", "algorithm.loss_type", objective="clipped"
)


@GRPO_LOSSES.register("grpo")
def completion_mean(per_token: torch.Tensor, mask: torch.Tensor, step: StepCounts) -> torch.Tensor:
    """The mean over completions of each completion's token mean (GRPO, DeepSeekMath): row-level."""
    return step_mean(masked_mean(per_token, mask, dim=1), None, step.completions, step.scale)


@GRPO_LOSSES.register("bnpo")
def token_mean(per_token: torch.Tensor, mask: torch.Tensor, step: StepCounts) -> torch.Tensor:
    """Token sum / the step's tokens (DAPO, Yu et al., 2025); every completion masked out: 0, not 0/0.
    TRL's bnpo divides by each micro-batch's own tokens, so its step depends on the micro-batching; here
    it is the step's token mean, the same loss as dapo."""
    return step_mean(per_token, mask, step.tokens, step.scale)


@GRPO_LOSSES.register("dr_grpo")
def constant_length_mean(per_token: torch.Tensor, mask: torch.Tensor, step: StepCounts) -> torch.Tensor:
    """Token sum / (completions · max_completion_length) (Dr. GRPO, Liu et al., 2025: no length bias)."""
    rows = per_token.shape[0] if step.completions is None else step.completions
    return step_mean(per_token, mask, rows * (step.max_completion_length or per_token.shape[1]), step.scale)


GRPO_LOSSES.add("dapo", token_mean)
GRPO_LOSSES.add("cispo", token_mean, objective="cispo")  # MiniMax-M1: dapo's token mean
GRPO_LOSSES.add("sapo", completion_mean, objective="sapo")  # SAPO: grpo's mean
GRPO_LOSS_TYPES = GRPO_LOSSES.names()
CLIP_LOSS_TYPES = GRPO_LOSSES.names(objective="clipped")  # the clipped objective, aggregated four ways


def grpo_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    epsilon: float = 0.2,
    epsilon_high: float | None = None,
    beta: float = 0.0,
    ref_logprobs: torch.Tensor | None = None,
    loss_type: str = "dapo",
    max_completion_length: int | None = None,
    num_items_in_batch: float | torch.Tensor | None = None,
    num_completions: float | torch.Tensor | None = None,
    scale: float = 1.0,
    *,
    importance_sampling_level: str = "token",
    delta: float | None = None,
    sapo_temperature_pos: float = 1.0,
    sapo_temperature_neg: float = 1.05,
    entropy: torch.Tensor | None = None,
    entropy_coef: float = 0.0,
    entropy_mask: torch.Tensor | None = None,
    rollout_weights: torch.Tensor | None = None,
    kl_estimator: str = "k3",
    use_bias_correction_kl: bool = False,
) -> GRPOLossOutput:
    """per_token = (w·objective − entropy_coef·H)·entropy_mask + β·KL_t, aggregated by loss_type.

    logprobs, old_logprobs, ref_logprobs, mask, entropy, entropy_mask, rollout_weights [N, R]; advantages [N].
    ρ: importance_weights(…, `importance_sampling_level`). `loss_type` (GRPO_LOSSES) names the objective
    (GRPO_OBJECTIVES) and the aggregation over the step's `num_items_in_batch` completion tokens and
    `num_completions` completions (StepCounts). w: alignlab.losses.rollout_correction; KL_t: rlhf.kl_loss_term.
    Raises ValueError: an unknown loss_type, importance_sampling_level or kl_estimator; entropy_coef without entropy."""
    kind = GRPO_LOSSES.entry(loss_type)
    objective = GRPO_OBJECTIVES[kind.objective]
    high = epsilon if epsilon_high is None else epsilon_high
    settings = ObjectiveSettings(epsilon, high, delta, sapo_temperature_pos, sapo_temperature_neg)
    mask = mask.to(logprobs.dtype)
    ratio = importance_weights(logprobs, old_logprobs, mask, importance_sampling_level)
    a = advantages.unsqueeze(1)
    per_token = objective.fn(ratio, a, logprobs, settings)
    per_token = _policy_term(per_token, rollout_weights, entropy, entropy_coef, entropy_mask)
    kl_t = kl_loss_term(logprobs, ref_logprobs, old_logprobs, kl_estimator, use_bias_correction_kl) if beta else None
    per_token, kl = _kl_term(per_token, kl_t, mask, beta)
    per_token = per_token * mask
    loss = kind.fn(per_token, mask, StepCounts(num_items_in_batch, num_completions, max_completion_length, scale))
    with torch.no_grad():
        mean_entropy = None if entropy is None else masked_mean(entropy.detach(), mask)
        clips = _clip_statistics(objective, ratio, a, mask, settings)
    return GRPOLossOutput(loss, per_token, kl, entropy=mean_entropy, **clips)


def _policy_term(
    per_token: torch.Tensor,
    rollout_weights: torch.Tensor | None,
    entropy: torch.Tensor | None,
    entropy_coef: float,
    entropy_mask: torch.Tensor | None,
) -> torch.Tensor:
    """The objective's per-token loss [N, R] times the rollout weights w (no gradient), minus entropy_coef·H
    (the policy's per-token entropy, with its gradient), on `entropy_mask`'s tokens: the bonus is averaged
    as the policy loss is. Raises ValueError for an entropy_coef without `entropy`."""
    if rollout_weights is not None:
        per_token = per_token * rollout_weights
    if entropy_coef != 0.0:
        if entropy is None:
            raise ValueError("grpo_loss: entropy_coef needs the policy's per-token entropy")
        per_token = per_token - entropy_coef * entropy
    if entropy_mask is not None:
        per_token = per_token * entropy_mask
    return per_token


def _kl_term(
    per_token: torch.Tensor, token_kl: torch.Tensor | None, mask: torch.Tensor, beta: float
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(per_token + β·token_kl on every token, the mean token_kl over `mask`'s tokens); None: (per_token, None)."""
    if token_kl is None:
        return per_token, None
    return per_token + beta * token_kl, masked_mean(token_kl, mask)


def _clip_statistics(
    objective: Entry, ratio: torch.Tensor, a: torch.Tensor, mask: torch.Tensor, settings: ObjectiveSettings
) -> dict[str, torch.Tensor | None]:
    """GRPOLossOutput's clip shares for `objective` (its `clips`; None for the others) and `clip_units`, what
    they count: tokens, or the completions with a token when the ratio is one per sequence, as TRL's."""
    units = mask if ratio.shape[1] == mask.shape[1] else (mask.sum(1, keepdim=True) > 0).to(mask.dtype)
    where = objective.clips(ratio, a, settings) if objective.clips is not None else {}
    shares = {key: masked_mean(hit.to(mask.dtype), units) for key, hit in where.items()}
    return {"clip_low": None, "clip_high": None, "cispo_clip": None, **shares, "clip_units": units.sum()}
