"""The statistics of one update: what an online algorithm logs about its optimizer steps on one rollout.

torchtune's `PPOStats` idea for every online algorithm: the update adds each micro-batch's statistics
to one record, by name, and the record turns them into the logged values in one way, over every device,
so PPO and GRPO (and what comes next) neither hand-roll their sums nor reduce them differently.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch


@dataclass
class UpdateStats:
    """Named statistics of an update's micro-batches, in two kinds.

    - a *mean* (`add`): a micro-batch's mean of something it counts (a token mean, a clip share over
      tokens or completions), weighted by that count; a step's value is Σ w·v / Σ w over its micro-batches
      and every device (the count clamped to at least 1, so a step with nothing to count gives 0);
    - a *share* (`add_shares`): a micro-batch's share of its step's value (a loss normalised by the
      step's totals), which adds up to the step's value; over devices, their mean (what DDP's averaged
      gradient is the gradient of).

    `end_step()` closes an optimizer step; `reduce` averages each statistic's step values over the
    update's steps. A value is the same however the steps were cut into micro-batches or spread over
    devices. Statistics given as None are not measured (e.g. a KL term the loss does not have).
    """

    means: dict[str, list[list]] = field(default_factory=dict)  # name -> per step [Σ w·v, Σ w]
    shares: dict[str, list[list]] = field(default_factory=dict)  # name -> per step [Σ v]
    steps: int = 0  # optimizer steps closed so far

    def add(self, weight: torch.Tensor | float, **values: torch.Tensor | None) -> None:
        """A micro-batch's means, each weighted by `weight` (e.g. its token count)."""
        for name, value in values.items():
            if value is not None:
                sums = self._this_step(self.means, name, 2)
                sums[0], sums[1] = sums[0] + value.detach() * weight, sums[1] + weight

    def add_shares(self, **values: torch.Tensor | None) -> None:
        """A micro-batch's shares of its step's values."""
        for name, value in values.items():
            if value is not None:
                sums = self._this_step(self.shares, name, 1)
                sums[0] = sums[0] + value.detach()

    def end_step(self) -> None:
        """Close the optimizer step: later micro-batches belong to the next."""
        self.steps += 1

    def reduce(self, mean_across_devices: Callable[[torch.Tensor], torch.Tensor]) -> dict[str, torch.Tensor]:
        """{name: the mean over the update's steps of the step's value over every device}, means first,
        each in the order first added. `mean_across_devices`: a per-device tensor's mean over devices
        (one call per statistic and kind of sum, on every device alike)."""
        out = {}
        for name, steps in self.means.items():
            totals, weights = _stacked(steps, 0), _stacked(steps, 1)
            out[name] = (mean_across_devices(totals) / mean_across_devices(weights).clamp(min=1)).mean()
        for name, steps in self.shares.items():
            out[name] = mean_across_devices(_stacked(steps, 0)).mean()
        return out

    def _this_step(self, table: dict, name: str, width: int) -> list:
        """This step's running sums of a statistic (zeros for the steps it was not measured in)."""
        steps = table.setdefault(name, [])
        steps += [[0.0] * width for _ in range(self.steps + 1 - len(steps))]
        return steps[self.steps]


def _stacked(steps: list[list], i: int) -> torch.Tensor:
    """[steps] the i-th running sum of every step, on the device and in the dtype of the first tensor."""
    like = next(s[i] for s in steps if torch.is_tensor(s[i]))
    return torch.stack([torch.as_tensor(s[i], dtype=like.dtype, device=like.device) for s in steps])
