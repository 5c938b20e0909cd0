"""The rollout engine's log-probs against the trainer's: truncated importance sampling and the mismatch.

An inference engine (vLLM) samples with its own kernels and precision, so the distribution it sampled
from, π_sampler, is not exactly the trainer's π_train even at the same weights. Yao et al. (2025,
"Your Efficient RL Framework Secretly Brings You Off-Policy RL Training", the TIS fix) weight each
token's policy-gradient term by the truncated ratio w_t = min(π_train(y_t) / π_sampler(y_t), C), which
makes the gradient an (at most C-biased) estimate of the on-policy one. TRL calls it
`vllm_importance_sampling_correction` (mode token_truncate) with the cap C.

Each correction mode is one function in ROLLOUT_CORRECTIONS, fn(train_logprobs, sampling_logprobs, mask,
cap) -> weights, under TRL's `vllm_importance_sampling_mode` name; token_truncate is the one there is.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from alignlab.registry import Registry

ROLLOUT_CORRECTIONS: Registry[Callable[..., torch.Tensor]] = Registry(
    "rollout correction mode", "algorithm.vllm_importance_sampling_mode"
)


@ROLLOUT_CORRECTIONS.register("token_truncate")
def truncated_importance_weights(
    train_logprobs: torch.Tensor, sampling_logprobs: torch.Tensor, mask: torch.Tensor, cap: float
) -> torch.Tensor:
    """w_t = min(exp(log π_train(y_t) − log π_sampler(y_t)), cap) on each completion token (Yao et al.,
    2025, truncated importance sampling), 1 where `mask` is 0 (no correction past an answer's end).

    train_logprobs, sampling_logprobs, mask [N, R]: the trainer's log-probs of the sampled tokens at
    rollout time (no gradient: the weight is a constant of the loss), the engine's of the same tokens at
    the same temperature, 1 on each completion's tokens. cap: C > 0. Returns [N, R] in the inputs' dtype.
    """
    ratio = torch.exp(train_logprobs - sampling_logprobs).clamp(max=cap)
    return torch.where(mask > 0, ratio, torch.ones_like(ratio))


def logprob_mismatch(
    train_logprobs: torch.Tensor, sampling_logprobs: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, max) over the completion tokens (`mask` [N, R] 1) of |log π_train(y_t) − log π_sampler(y_t)|,
    scalars; both 0 without tokens. TRL logs them as sampling/sampling_logp_difference/{mean,max}."""
    delta = (train_logprobs - sampling_logprobs).abs()[mask > 0]
    if delta.numel() == 0:
        zero = torch.zeros((), dtype=train_logprobs.dtype, device=train_logprobs.device)
        return zero, zero
    return delta.mean(), delta.max()
