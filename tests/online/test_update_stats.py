"""UpdateStats: an update's statistics, weighted over micro-batches, reduced once over devices, averaged
over optimizer steps; numbers checked by hand."""

from __future__ import annotations

import torch

from alignlab.online.update_stats import UpdateStats


def t(x: float) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float64)


def one_device(value: torch.Tensor) -> torch.Tensor:
    return value


def test_means_weigh_by_their_count_and_shares_add_up_within_a_step_then_steps_average():
    stats = UpdateStats()
    stats.add(t(2.0), clipfrac=t(1.0), kl=None)  # None: not measured, never logged
    stats.add(t(6.0), clipfrac=t(3.0))
    stats.add_shares(loss=t(0.25))
    stats.add_shares(loss=t(0.5))
    stats.end_step()  # step 1: clipfrac (2·1 + 6·3) / 8 = 2.5, loss 0.75
    stats.add(t(4.0), clipfrac=t(0.5))
    stats.add_shares(loss=t(0.25))
    stats.end_step()  # step 2: clipfrac 0.5, loss 0.25
    out = stats.reduce(one_device)
    assert list(out) == ["clipfrac", "loss"]
    assert out["clipfrac"].item() == 1.5 and out["loss"].item() == 0.5


def test_a_step_with_nothing_to_count_gives_zero_not_nan():
    stats = UpdateStats()
    stats.add(t(0.0), clipfrac=t(0.0))
    stats.end_step()
    assert stats.reduce(one_device)["clipfrac"].item() == 0.0


def test_over_devices_a_mean_pools_every_devices_counts_and_a_share_is_averaged():
    """Device A holds 1 token with clipfrac 1, device B 3 tokens with clipfrac 3: the step's token mean
    is (1 + 9) / 4 = 2.5 (a mean of the devices' means would say 2); loss shares 0.2 and 0.6 → 0.4."""
    devices = [UpdateStats(), UpdateStats()]
    for stats, (tokens, clipfrac, loss) in zip(devices, [(1.0, 1.0, 0.2), (3.0, 3.0, 0.6)]):
        stats.add(t(tokens), clipfrac=t(clipfrac))
        stats.add_shares(loss=t(loss))
        stats.end_step()
    seen: list[torch.Tensor] = []  # what device B hands each collective, in order
    devices[1].reduce(lambda value: seen.append(value) or value)
    calls = iter(seen)
    out = devices[0].reduce(lambda value: (value + next(calls)) / 2)  # each collective: the devices' mean
    assert out["clipfrac"].item() == 2.5
    assert abs(out["loss"].item() - 0.4) < 1e-15
