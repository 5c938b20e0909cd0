"""DPO loss and its variants, as pure functions of summed answer log-probs.

The loss types and their units follow TRL 1.16's DPOTrainer (the names the field compares with): every
input is an answer's log-prob summed over its tokens, except where a loss divides by the answer's token
count (`sigmoid_norm`, and `ipo` with `ipo_normalize_length`). `sft` is the NLL of the chosen answer over
the step's chosen tokens (alignlab.losses.nll_loss), so it is not computed here.

Each loss type is one function in the registry `DPO_LOSSES`, of the pair's quantities (`PairScores`), with
its paper in its docstring; its properties (built on h, sorts the pairs, reads the answers' lengths, ...)
are what the config check and the name tuples below read. A new loss type is one decorated function here
(or in the user's own module, named by dotted path in `algorithm.loss_type`), its test and its row in
docs/algorithms.md.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

from alignlab.registry import Entry, Registry


class PairScores(NamedTuple):
    """What a DPO loss type reads of B preference pairs: [B] tensors (log-probs summed over each answer's
    tokens) and the loss's settings."""

    policy_chosen_logps: torch.Tensor  # log π(y_w|x)
    policy_rejected_logps: torch.Tensor  # log π(y_l|x)
    ref_chosen_logps: torch.Tensor  # log π_ref(y_w|x); 0 when reference-free
    ref_rejected_logps: torch.Tensor  # log π_ref(y_l|x)
    chosen_logratios: torch.Tensor  # r_w = log π(y_w|x) − log π_ref(y_w|x)
    rejected_logratios: torch.Tensor  # r_l likewise
    h: torch.Tensor  # s_w − s_l, s = f'(e^r) the f-divergence score (s = r for the reverse KL); each s divided by
    # its answer's token count for the loss types that read lengths (needs_lengths, length_normalisable)
    beta: float  # β
    label_smoothing: float  # ε
    discopop_tau: float  # τ of discopop


class DPOLossOutput(NamedTuple):
    losses: torch.Tensor  # [B] per-pair loss
    chosen_rewards: torch.Tensor  # [B] β·(log π(y_w|x) − log π_ref(y_w|x)), detached
    rejected_rewards: torch.Tensor  # [B] β·(log π(y_l|x) − log π_ref(y_l|x)), detached


def implicit_rewards(logratios: torch.Tensor, beta: float) -> torch.Tensor:
    """DPO's implicit reward β·(log π(y|x) − log π_ref(y|x)) (Rafailov et al., 2023, arXiv:2305.18290, eq. 5,
    without β·log Z(x), which cancels between two answers to one prompt), detached; `logratios` [B]. The
    rewards DPO's and KTO's loss types all report (TRL's)."""
    return beta * logratios.detach()


# -- f-divergence scores ------------------------------------------------------------------------------------
# f'(u) at u = π(y|x)/π_ref(y|x), the score f-DPO compares between the two answers in place of log u (Wang et
# al., 2023, "Beyond Reverse KL", arXiv:2309.16240, Theorem 1), up to a constant that cancels in the
# chosen − rejected difference. Each takes [B] log-ratios and α (`f_alpha_divergence_coef`).
F_DIVERGENCES: Registry[Callable[[torch.Tensor, float], torch.Tensor]] = Registry(
    "f-divergence", "algorithm.f_divergence_type"
)


@F_DIVERGENCES.register("reverse_kl")
def reverse_kl_score(logratios: torch.Tensor, alpha: float) -> torch.Tensor:
    """log u: DPO itself (the same tensor, so DPO's numbers do not depend on this step)."""
    return logratios


@F_DIVERGENCES.register("forward_kl")
def forward_kl_score(logratios: torch.Tensor, alpha: float) -> torch.Tensor:
    """1 − 1/u = 1 − π_ref/π (f-DPO, table 1; TRL's constant 1)."""
    return 1 - torch.exp(-logratios)


@F_DIVERGENCES.register("js_divergence")
def js_divergence_score(logratios: torch.Tensor, alpha: float) -> torch.Tensor:
    """log(2u/(1+u)) = log 2 + log σ(log u) (f-DPO, table 1)."""
    return math.log(2) + F.logsigmoid(logratios)


@F_DIVERGENCES.register("alpha_divergence")
def alpha_divergence_score(logratios: torch.Tensor, alpha: float) -> torch.Tensor:
    """(u^(α−1) − 1)/(α−1) in TRL 1.16's parameterisation (the paper's α is 1 − this α); log u when
    |α − 1| < 1e-6 (its limit). The exponent is capped at 80 (exp(80) is finite in float32), as TRL caps it."""
    if abs(alpha - 1.0) < 1e-6:
        return logratios
    return (torch.exp(((alpha - 1.0) * logratios).clamp(max=80.0)) - 1.0) / (alpha - 1.0)


F_DIVERGENCE_TYPES = F_DIVERGENCES.names()


def f_divergence_scores(logratios: torch.Tensor, f_divergence_type: Any = "reverse_kl", alpha: float = 0.5):
    """The f-divergence score f'(e^r) of each answer (see F_DIVERGENCES), in logratios' dtype.

    Args:
        logratios: [B] log π(y|x) − log π_ref(y|x), summed over the answer's tokens.
        f_divergence_type: a name in F_DIVERGENCE_TYPES, or a dotted path to the user's own score function.
        alpha: α of `alpha_divergence` (TRL's `f_alpha_divergence_coef`).
    Returns:
        [B] scores.
    Raises:
        ConfigError: an unknown f_divergence_type (naming the closest).
    """
    return F_DIVERGENCES.resolve(f_divergence_type).fn(logratios, alpha)


# -- the loss types -------------------------------------------------------------------------------------
DPO_LOSSES: Registry[Callable[[PairScores], torch.Tensor]] = Registry(
    "DPO loss type",
    "algorithm.loss_type",
    f_divergence=False,  # built on h alone: an f-divergence other than the reverse KL generalises it (f-DPO's
    # β·log Z(x) cancels only in that difference; TRL refuses the others too)
    sorts_pairs=False,  # sorts the batch's pairs (AOT): a per-pair weight (WPO) would land on another pair
    needs_lengths=False,  # reads h on length-normalised scores, so the answers' token counts
    length_normalisable=False,  # reads h on length-normalised scores when ipo_normalize_length is true
    needs_label_smoothing=False,  # needs label_smoothing (ε) > 0
    token_mean=False,  # not a per-pair loss: a mean over the step's tokens that the DPO module computes (sft)
)


@DPO_LOSSES.register("sigmoid", f_divergence=True)
def sigmoid_loss(p: PairScores) -> torch.Tensor:
    """−(1−ε)·log σ(βh) − ε·log σ(−βh): DPO (Rafailov et al., 2023, arXiv:2305.18290, eq. 7); ε > 0: cDPO
    (Mitchell, 2023, conservative DPO)."""
    eps = p.label_smoothing
    return -(1 - eps) * F.logsigmoid(p.beta * p.h) - eps * F.logsigmoid(-p.beta * p.h)


@DPO_LOSSES.register("hinge", f_divergence=True)
def hinge_loss(p: PairScores) -> torch.Tensor:
    """max(0, 1 − βh): SLiC (Zhao et al., 2023, arXiv:2305.10425)."""
    return torch.relu(1 - p.beta * p.h)


@DPO_LOSSES.register("ipo", f_divergence=True, length_normalisable=True)
def ipo_loss(p: PairScores) -> torch.Tensor:
    """(h − 1/(2β))²: IPO (Azar et al., 2023, arXiv:2310.12036, eq. 17); with ipo_normalize_length each score
    divided by its answer's token count (TRL's and ms-swift's units)."""
    return (p.h - 1 / (2 * p.beta)) ** 2


@DPO_LOSSES.register("robust", f_divergence=True)
def robust_loss(p: PairScores) -> torch.Tensor:
    """[(1−ε)·(−log σ(βh)) − ε·(−log σ(−βh))]/(1 − 2ε): rDPO (Chowdhury et al., 2024, arXiv:2403.00409),
    unbiased under a rate ε of flipped labels."""
    eps = p.label_smoothing
    return ((1 - eps) * -F.logsigmoid(p.beta * p.h) - eps * -F.logsigmoid(-p.beta * p.h)) / (1 - 2 * eps)


@DPO_LOSSES.register("exo_pair", f_divergence=True, needs_label_smoothing=True)
def exo_pair_loss(p: PairScores) -> torch.Tensor:
    """KL(q‖p) over the pair, q = (σ(βh), σ(−βh)), p = (1−ε, ε): EXO (Ji et al., 2024, arXiv:2402.00856,
    eq. 16 with K = 2; the paper's ε is 1e-3)."""
    eps = p.label_smoothing
    log_q_w, log_q_l = F.logsigmoid(p.beta * p.h), F.logsigmoid(-p.beta * p.h)
    return log_q_w.exp() * (log_q_w - math.log1p(-eps)) + log_q_l.exp() * (log_q_l - math.log(eps))


@DPO_LOSSES.register("nca_pair")
def nca_pair_loss(p: PairScores) -> torch.Tensor:
    """−log σ(βr_w) − ½·log σ(−βr_w) − ½·log σ(−βr_l): NCA (Chen et al., 2024, arXiv:2402.05369)."""
    rw, rl = p.beta * p.chosen_logratios, p.beta * p.rejected_logratios
    return -F.logsigmoid(rw) - 0.5 * F.logsigmoid(-rw) - 0.5 * F.logsigmoid(-rl)


@DPO_LOSSES.register("bco_pair")
def bco_pair_loss(p: PairScores) -> torch.Tensor:
    """−log σ(βr_w) − log σ(−βr_l): BCO (Jung et al., 2024, arXiv:2404.04656) without its running reward
    shift, as TRL 1.16 and MPO use it."""
    return -F.logsigmoid(p.beta * p.chosen_logratios) - F.logsigmoid(-p.beta * p.rejected_logratios)


@DPO_LOSSES.register("sppo_hard")
def sppo_hard_loss(p: PairScores) -> torch.Tensor:
    """(r_w − 1/(2β))² + (r_l + 1/(2β))²: SPPO (Wu et al., 2024, arXiv:2405.00675, eq. 4.7 with the winner's
    probability 1 and the loser's 0)."""
    return (p.chosen_logratios - 0.5 / p.beta) ** 2 + (p.rejected_logratios + 0.5 / p.beta) ** 2


@DPO_LOSSES.register("aot", sorts_pairs=True)
def aot_loss(p: PairScores) -> torch.Tensor:
    """The sigmoid loss (with ε) on δ = sort(log π_w − log π_l) − sort(log π_ref,w − log π_ref,l), sorted
    over the batch's pairs: AOT (Melnyk et al., 2024, arXiv:2406.05882)."""
    policy = torch.sort(p.policy_chosen_logps - p.policy_rejected_logps, dim=0).values
    delta = policy - torch.sort(p.ref_chosen_logps - p.ref_rejected_logps, dim=0).values
    return sigmoid_loss(p._replace(h=delta))


@DPO_LOSSES.register("aot_unpaired", sorts_pairs=True)
def aot_unpaired_loss(p: PairScores) -> torch.Tensor:
    """The sigmoid loss (with ε) on δ = sort(r_w) − sort(r_l): AOT's unpaired form (Melnyk et al., 2024,
    arXiv:2406.05882)."""
    delta = torch.sort(p.chosen_logratios, dim=0).values - torch.sort(p.rejected_logratios, dim=0).values
    return sigmoid_loss(p._replace(h=delta))


@DPO_LOSSES.register("apo_zero")
def apo_zero_loss(p: PairScores) -> torch.Tensor:
    """(1 − σ(βr_w)) + σ(βr_l): APO-zero (D'Oosterlinck et al., 2024, arXiv:2408.06266, eq. 7)."""
    return (1 - torch.sigmoid(p.beta * p.chosen_logratios)) + torch.sigmoid(p.beta * p.rejected_logratios)


@DPO_LOSSES.register("apo_down")
def apo_down_loss(p: PairScores) -> torch.Tensor:
    """σ(βr_w) + (1 − σ(β(r_w − r_l))): APO-down (D'Oosterlinck et al., 2024, arXiv:2408.06266, eq. 8)."""
    return torch.sigmoid(p.beta * p.chosen_logratios) + (1 - torch.sigmoid(p.beta * p.h))


@DPO_LOSSES.register("discopop", f_divergence=True)
def discopop_loss(p: PairScores) -> torch.Tensor:
    """(1 − σ(βh/τ))·(−log σ(βh)) + σ(βh/τ)·e^(−βh), τ = discopop_tau: DiscoPOP's LRML (Lu et al., 2024,
    arXiv:2406.08414, eq. 5)."""
    # σ(ρ/τ)·e^(−ρ) as one exponent: written as a product, e^(−ρ) overflows and σ(ρ/τ) underflows once
    # ρ < about −88.7 in float32, and inf·0 is NaN although the loss is finite (≈ −ρ there).
    rho, tau = p.beta * p.h, p.discopop_tau
    return torch.sigmoid(-rho / tau) * -F.logsigmoid(rho) + torch.exp(F.logsigmoid(rho / tau) - rho)


@DPO_LOSSES.register("sigmoid_norm", f_divergence=True, needs_lengths=True)
def sigmoid_norm_loss(p: PairScores) -> torch.Tensor:
    """−log σ(β·(s_w/|y_w| − s_l/|y_l|)): length-normalised DPO (Tülu 3, Lambert et al., 2024,
    arXiv:2411.15124)."""
    return -F.logsigmoid(p.beta * p.h)


@DPO_LOSSES.register("sft", f_divergence=True, token_mean=True)
def sft_loss(p: PairScores) -> torch.Tensor:
    """TRL's `sft` (as MPO, Wang et al., 2024, arXiv:2411.10442, mixes it in): the chosen answer's NLL, a mean
    over the optimizer step's chosen tokens rather than a per-pair loss, so the DPO module computes it with
    alignlab.losses.nll_loss. Raises ValueError: no per-pair value exists."""
    raise ValueError("loss_type=sft is the chosen answer's token-mean NLL (sft is nll_loss), not a per-pair loss")


# The names the config checks, tests and docs read, derived from the registry.
DPO_LOSS_TYPES = DPO_LOSSES.names()
PAIR_LOSS_TYPES = DPO_LOSSES.names(token_mean=False)  # the per-pair ones, which dpo_loss computes
F_DIVERGENCE_LOSS_TYPES = DPO_LOSSES.names(f_divergence=True)
SORTING_LOSS_TYPES = DPO_LOSSES.names(sorts_pairs=True)


def pair_scores(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    lengths: tuple[torch.Tensor, torch.Tensor] | None,
    score: Callable[[torch.Tensor], torch.Tensor],
    **settings: float,
) -> PairScores:
    """The pair's quantities every loss type reads: log-ratios, and h from the scores `score` gives them,
    each divided by its answer's token count `lengths` ([B] chosen, [B] rejected; below 1 counts as 1)
    unless None. `settings`: beta, label_smoothing, discopop_tau."""
    chosen_logratios = policy_chosen_logps - ref_chosen_logps
    rejected_logratios = policy_rejected_logps - ref_rejected_logps
    chosen_scores, rejected_scores = score(chosen_logratios), score(rejected_logratios)
    if lengths is None:
        h = chosen_scores - rejected_scores
    else:
        h = chosen_scores / lengths[0].clamp(min=1) - rejected_scores / lengths[1].clamp(min=1)
    logps = (policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    return PairScores(*logps, chosen_logratios, rejected_logratios, h, **settings)


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float = 0.1,
    loss_type: str | Mapping = "sigmoid",
    label_smoothing: float = 0.0,
    discopop_tau: float = 0.05,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
    ipo_normalize_length: bool = False,
    f_divergence_type: str | Mapping = "reverse_kl",
    f_alpha_divergence_coef: float = 0.5,
) -> DPOLossOutput:
    """Direct Preference Optimization (Rafailov et al., 2023, arXiv:2305.18290) and the variants the field
    compares with, per pair: the loss type `loss_type` names in DPO_LOSSES (each function there gives its
    formula and paper; docs/algorithms.md tabulates them), of the pair's quantities (`pair_scores`).

    Args:
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps: [B] summed
            answer log-probs (nats).
        loss_type: a name in PAIR_LOSS_TYPES, a dotted path to the user's own function of PairScores, or
            `{_target_: dotted.path, **kwargs}`. label_smoothing: ε; discopop_tau: τ of `discopop`.
        chosen_lengths, rejected_lengths: [B] answer token counts; needed by `sigmoid_norm` and by `ipo`
            with ipo_normalize_length (a count below 1 counts as 1).
        f_divergence_type, f_alpha_divergence_coef: see f_divergence_scores; only the loss types in
            F_DIVERGENCE_LOSS_TYPES read the scores.
    Returns:
        DPOLossOutput: [B] losses, and the detached rewards β·r_w, β·r_l (in every loss type's units).
    Raises:
        ConfigError: an unknown loss_type or f_divergence_type. ValueError: `sft` (which nll_loss computes),
            or what check_pair_loss refuses.
    """
    entry, divergence = DPO_LOSSES.resolve(loss_type), F_DIVERGENCES.resolve(f_divergence_type)
    normalised = entry.needs_lengths or (entry.length_normalisable and ipo_normalize_length)
    lengths = (chosen_lengths, rejected_lengths) if normalised else None
    check_pair_loss(entry, divergence.name, label_smoothing, lengths)
    pair = pair_scores(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, lengths,
        lambda r: divergence.fn(r, f_alpha_divergence_coef),
        beta=beta, label_smoothing=label_smoothing, discopop_tau=discopop_tau,
    )  # fmt: skip
    rewards = (implicit_rewards(pair.chosen_logratios, beta), implicit_rewards(pair.rejected_logratios, beta))
    return DPOLossOutput(entry.fn(pair), *rewards)


def check_pair_loss(entry: Entry, f_divergence_type: str, label_smoothing: float, lengths: tuple | None) -> None:
    """Refuse what the loss type `entry` cannot compute: an f-divergence it is not built for, ε = 0 where it
    needs ε, `lengths` (chosen, rejected) with a None where it divides by them. Raises ValueError."""
    if f_divergence_type != "reverse_kl" and not entry.f_divergence:
        raise ValueError(
            f"f_divergence_type={f_divergence_type!r} applies to {DPO_LOSSES.names(f_divergence=True)}, "
            f"not {entry.name}"
        )
    if entry.needs_label_smoothing and not label_smoothing > 0:
        raise ValueError(f"loss_type={entry.name} needs label_smoothing > 0 (its ε)")
    if lengths is not None and any(n is None for n in lengths):
        raise ValueError(f"loss_type={entry.name} divides by the answers' token counts: pass chosen/rejected_lengths")


def length_desensitised_logps(
    token_logps: torch.Tensor, mask: torch.Tensor, shared_lengths: torch.Tensor, ld_alpha: float
) -> torch.Tensor:
    """LD-DPO's answer log-prob (Liu et al., 2024, "Length Desensitization in DPO", arXiv:2409.06411, eq. 9):
    the first ℓ answer tokens count fully and the rest with weight α, ℓ = min(|y_w|, |y_l|) of the pair;
    α = 1 is the plain sum, α = 0 keeps the shared length only.

    Args:
        token_logps: [N, T] per-token log-probs (0 outside the answer).
        mask: [N, T] 1 at answer tokens.
        shared_lengths: [N] ℓ for each row (the same for a pair's chosen and rejected rows).
        ld_alpha: α in [0, 1].
    Returns:
        [N] Σ_{k ≤ ℓ} log π(y_k) + α·Σ_{k > ℓ} log π(y_k), k counting answer tokens from 1.
    """
    position = mask.cumsum(-1)  # k at each answer token
    shared = (mask > 0) & (position <= shared_lengths.unsqueeze(-1))
    tail = (mask > 0) & (position > shared_lengths.unsqueeze(-1))
    return (token_logps * shared).sum(-1) + ld_alpha * (token_logps * tail).sum(-1)


def wpo_weights(token_logps: torch.Tensor, token_log_sum_sq_probs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """WPO's per-answer weight (Zhou et al., 2024, arXiv:2406.11827, eq. 2, the "sampled alignment" form):
    exp of the mean over the answer's tokens of log π(y_t) − log Σ_v π(v)², which is 1 for an answer the
    policy would sample greedily with certainty and smaller the less on-policy the answer is. Detached.

    Args:
        token_logps: [N, T] log π(y_t | x, y_<t) (0 outside the answer).
        token_log_sum_sq_probs: [N, T] log Σ_v π(v | x, y_<t)² at each position.
        mask: [N, T] 1 at answer tokens.
    Returns:
        [N] weights in (0, 1]; a pair's weight is its chosen weight times its rejected weight.
    """
    with torch.no_grad():
        aligned = (token_logps - token_log_sum_sq_probs) * mask
        return torch.exp(aligned.sum(-1) / mask.sum(-1).clamp(min=1))
