"""DPO loss and its variants, as pure functions of summed answer log-probs.

The loss types and their units follow TRL 1.16's DPOTrainer (the names the field compares with): every
input is an answer's log-prob summed over its tokens, except where a loss divides by the answer's token
count (`sigmoid_norm`, and `ipo` with `ipo_normalize_length`). `sft` is the NLL of the chosen answer over
the step's chosen tokens (alignlab.losses.nll_loss), so it is not computed here.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

# The per-pair loss types dpo_loss computes, then `sft` (a token mean, computed by nll_loss).
PAIR_LOSS_TYPES = (
    "sigmoid",
    "hinge",
    "ipo",
    "robust",
    "exo_pair",
    "nca_pair",
    "bco_pair",
    "sppo_hard",
    "aot",
    "aot_unpaired",
    "apo_zero",
    "apo_down",
    "discopop",
    "sigmoid_norm",
)
DPO_LOSS_TYPES = (*PAIR_LOSS_TYPES, "sft")
F_DIVERGENCE_TYPES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
# The loss types built on the chosen − rejected score difference h, the only ones an f-divergence other than
# the reverse KL generalises (f-DPO's β·log Z(x) cancels only in that difference; TRL refuses the others too).
F_DIVERGENCE_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "robust", "exo_pair", "discopop", "sigmoid_norm", "sft")
# Loss types that sort the batch's pairs (AOT): a per-pair weight (WPO) would land on another pair.
SORTING_LOSS_TYPES = ("aot", "aot_unpaired")
# Loss types that read the answers' token counts (chosen_lengths, rejected_lengths).
LENGTH_LOSS_TYPES = ("sigmoid_norm",)


class DPOLossOutput(NamedTuple):
    losses: torch.Tensor  # [B] per-pair loss
    chosen_rewards: torch.Tensor  # [B] β·(log π(y_w|x) − log π_ref(y_w|x)), detached
    rejected_rewards: torch.Tensor  # [B] β·(log π(y_l|x) − log π_ref(y_l|x)), detached


def f_divergence_scores(logratios: torch.Tensor, f_divergence_type: str = "reverse_kl", alpha: float = 0.5):
    """f'(u) at u = π(y|x)/π_ref(y|x), the score f-DPO compares between the two answers in place of
    log u (Wang et al., 2023, "Beyond Reverse KL", arXiv:2309.16240, Theorem 1), up to a constant that
    cancels in the chosen − rejected difference.

    Args:
        logratios: [B] log π(y|x) − log π_ref(y|x), summed over the answer's tokens.
        f_divergence_type: `reverse_kl`: log u (DPO) · `forward_kl`: 1 − 1/u · `js_divergence`:
            log(2u/(1+u)) = log 2 + log σ(log u) · `alpha_divergence`: (u^(α−1) − 1)/(α−1) (TRL 1.16's
            parameterisation; the paper's α is 1 − this α), log u when |α − 1| < 1e-6 (its limit).
        alpha: α of `alpha_divergence` (TRL's `f_alpha_divergence_coef`).
    Returns:
        [B] scores in logratios' dtype. The α-divergence's exponent is capped at 80 (exp(80) is finite
        in float32), as TRL caps it.
    Raises:
        ValueError: an unknown f_divergence_type.
    """
    if f_divergence_type == "reverse_kl":
        return logratios
    if f_divergence_type == "forward_kl":
        return 1 - torch.exp(-logratios)
    if f_divergence_type == "js_divergence":
        return math.log(2) + F.logsigmoid(logratios)
    if f_divergence_type == "alpha_divergence":
        if abs(alpha - 1.0) < 1e-6:
            return logratios
        return (torch.exp(((alpha - 1.0) * logratios).clamp(max=80.0)) - 1.0) / (alpha - 1.0)
    raise ValueError(f"f_divergence_type must be one of {F_DIVERGENCE_TYPES}, got {f_divergence_type!r}")


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    discopop_tau: float = 0.05,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
    ipo_normalize_length: bool = False,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = 0.5,
) -> DPOLossOutput:
    """Direct Preference Optimization (Rafailov et al., 2023, arXiv:2305.18290) and the variants the field
    compares with, per pair.

    With r_w = log π(y_w) − log π_ref(y_w), r_l likewise, s = f'(e^r) the f-divergence score
    (f_divergence_scores; s = r for the reverse KL), h = s_w − s_l and ε = label_smoothing:
    - sigmoid:   −(1−ε)·log σ(βh) − ε·log σ(−βh)         (DPO; ε > 0: cDPO)
    - hinge:     max(0, 1 − βh)                            (SLiC, Zhao et al., 2023, arXiv:2305.10425)
    - ipo:       (h − 1/(2β))²; with ipo_normalize_length each s divided by its answer's token count
                 (IPO, Azar et al., 2023, arXiv:2310.12036, eq. 17; TRL and ms-swift normalise)
    - robust:    [(1−ε)·(−log σ(βh)) − ε·(−log σ(−βh))]/(1 − 2ε)   (rDPO, Chowdhury et al., 2024)
    - exo_pair:  KL(q‖p) over the pair, q = (σ(βh), σ(−βh)), p = (1−ε, ε)   (EXO, Ji et al., 2024,
                 arXiv:2402.00856, eq. 16; needs ε > 0)
    - nca_pair:  −log σ(βr_w) − ½·log σ(−βr_w) − ½·log σ(−βr_l)   (NCA, Chen et al., 2024, arXiv:2402.05369)
    - bco_pair:  −log σ(βr_w) − log σ(−βr_l)   (BCO, Jung et al., 2024, arXiv:2404.04656, without its
                 running reward shift, as TRL 1.16 and MPO use it)
    - sppo_hard: (r_w − 1/(2β))² + (r_l + 1/(2β))²   (SPPO, Wu et al., 2024, arXiv:2405.00675, eq. 4.7 with
                 the winner's probability 1 and the loser's 0)
    - aot:       sigmoid loss (with ε) on δ = sort(log π_w − log π_l) − sort(log π_ref,w − log π_ref,l),
                 sorted over the batch's pairs (AOT, Melnyk et al., 2024, arXiv:2406.05882)
    - aot_unpaired: the same on δ = sort(r_w) − sort(r_l)
    - apo_zero:  (1 − σ(βr_w)) + σ(βr_l)   (APO-zero, D'Oosterlinck et al., 2024, arXiv:2408.06266, eq. 7)
    - apo_down:  σ(βr_w) + (1 − σ(β(r_w − r_l)))   (APO-down, eq. 8)
    - discopop:  (1 − σ(βh/τ))·(−log σ(βh)) + σ(βh/τ)·e^(−βh), τ = discopop_tau   (DiscoPOP's LRML,
                 Lu et al., 2024, arXiv:2406.08414, eq. 5)
    - sigmoid_norm: −log σ(β·(s_w/|y_w| − s_l/|y_l|))   (length-normalised DPO, Tülu 3, arXiv:2411.15124)

    Args:
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps: [B] summed
            answer log-probs (nats).
        chosen_lengths, rejected_lengths: [B] answer token counts; needed by `sigmoid_norm` and by `ipo`
            with ipo_normalize_length (a count below 1 counts as 1).
        f_divergence_type, f_alpha_divergence_coef: see f_divergence_scores; only the loss types in
            F_DIVERGENCE_LOSS_TYPES read the scores.
    Returns:
        DPOLossOutput: [B] losses, and the detached rewards β·r_w, β·r_l (in every loss type's units).
    Raises:
        ValueError: an unknown loss_type (or `sft`, which nll_loss computes), an f-divergence with a loss
            type outside F_DIVERGENCE_LOSS_TYPES, missing lengths, or exo_pair with ε = 0.
    """
    if loss_type not in PAIR_LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {PAIR_LOSS_TYPES} (sft is nll_loss), got {loss_type!r}")
    if f_divergence_type != "reverse_kl" and loss_type not in F_DIVERGENCE_LOSS_TYPES:
        raise ValueError(
            f"f_divergence_type={f_divergence_type!r} applies to {F_DIVERGENCE_LOSS_TYPES}, not {loss_type}"
        )
    chosen_logratios = policy_chosen_logps - ref_chosen_logps
    rejected_logratios = policy_rejected_logps - ref_rejected_logps
    if f_divergence_type == "reverse_kl":  # the same operations as before f-divergences existed: bit-identical
        h = chosen_logratios - rejected_logratios
        chosen_scores, rejected_scores = chosen_logratios, rejected_logratios
    else:
        chosen_scores = f_divergence_scores(chosen_logratios, f_divergence_type, f_alpha_divergence_coef)
        rejected_scores = f_divergence_scores(rejected_logratios, f_divergence_type, f_alpha_divergence_coef)
        h = chosen_scores - rejected_scores
    if loss_type == "sigmoid_norm" or (loss_type == "ipo" and ipo_normalize_length):
        if chosen_lengths is None or rejected_lengths is None:
            raise ValueError(
                f"loss_type={loss_type} divides by the answers' token counts: pass chosen/rejected_lengths"
            )
        h = chosen_scores / chosen_lengths.clamp(min=1) - rejected_scores / rejected_lengths.clamp(min=1)
    eps = label_smoothing
    if loss_type == "sigmoid":
        losses = -(1 - eps) * F.logsigmoid(beta * h) - eps * F.logsigmoid(-beta * h)
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * h)
    elif loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    elif loss_type == "robust":
        losses = ((1 - eps) * -F.logsigmoid(beta * h) - eps * -F.logsigmoid(-beta * h)) / (1 - 2 * eps)
    elif loss_type == "exo_pair":
        if not eps > 0:
            raise ValueError("loss_type=exo_pair needs label_smoothing > 0 (EXO's ε; the paper uses 1e-3)")
        log_q_w, log_q_l = F.logsigmoid(beta * h), F.logsigmoid(-beta * h)
        losses = log_q_w.exp() * (log_q_w - math.log1p(-eps)) + log_q_l.exp() * (log_q_l - math.log(eps))
    elif loss_type == "nca_pair":
        rw, rl = beta * chosen_logratios, beta * rejected_logratios
        losses = -F.logsigmoid(rw) - 0.5 * F.logsigmoid(-rw) - 0.5 * F.logsigmoid(-rl)
    elif loss_type == "bco_pair":
        losses = -F.logsigmoid(beta * chosen_logratios) - F.logsigmoid(-beta * rejected_logratios)
    elif loss_type == "sppo_hard":
        losses = (chosen_logratios - 0.5 / beta) ** 2 + (rejected_logratios + 0.5 / beta) ** 2
    elif loss_type in SORTING_LOSS_TYPES:
        if loss_type == "aot":
            policy = torch.sort(policy_chosen_logps - policy_rejected_logps, dim=0).values
            delta = policy - torch.sort(ref_chosen_logps - ref_rejected_logps, dim=0).values
        else:
            delta = torch.sort(chosen_logratios, dim=0).values - torch.sort(rejected_logratios, dim=0).values
        losses = -(1 - eps) * F.logsigmoid(beta * delta) - eps * F.logsigmoid(-beta * delta)
    elif loss_type == "apo_zero":
        losses = (1 - torch.sigmoid(beta * chosen_logratios)) + torch.sigmoid(beta * rejected_logratios)
    elif loss_type == "apo_down":
        losses = torch.sigmoid(beta * chosen_logratios) + (
            1 - torch.sigmoid(beta * (chosen_logratios - rejected_logratios))
        )
    elif loss_type == "discopop":
        # σ(ρ/τ)·e^(−ρ) as one exponent: written as a product, e^(−ρ) overflows and σ(ρ/τ) underflows once
        # ρ < about −88.7 in float32, and inf·0 is NaN although the loss is finite (≈ −ρ there).
        rho = beta * h
        losses = torch.sigmoid(-rho / discopop_tau) * -F.logsigmoid(rho) + torch.exp(
            F.logsigmoid(rho / discopop_tau) - rho
        )
    else:  # sigmoid_norm
        losses = -F.logsigmoid(beta * h)
    chosen_rewards = beta * chosen_logratios.detach()
    rejected_rewards = beta * rejected_logratios.detach()
    return DPOLossOutput(losses, chosen_rewards, rejected_rewards)


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
