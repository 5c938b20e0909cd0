"""Range checks for config values, each failing with the key's full name and the allowed range."""

from __future__ import annotations

import difflib
import logging
from collections.abc import Iterable
from typing import Any

from omegaconf import DictConfig, OmegaConf

from alignlab.errors import ConfigError
from alignlab.losses.rlhf import kl_loss_gradient
from alignlab.registry import Registry

log = logging.getLogger(__name__)


class Checks:
    """`Checks(cfg.algorithm, "algorithm").positive("beta")` → "algorithm.beta must be > 0, got 0"."""

    def __init__(self, section: DictConfig, prefix: str):
        self.section, self.prefix = section, prefix

    def _fail(self, key: str, allowed: str) -> None:
        raise ConfigError(f"{self.prefix}.{key} must be {allowed}, got {self.section[key]!r}")

    def _number(self, key: str) -> float:
        value: Any = self.section[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            self._fail(key, "a number")
        return value

    def positive(self, *keys: str) -> Checks:
        for key in keys:
            if not self._number(key) > 0:
                self._fail(key, "> 0")
        return self

    def non_negative(self, *keys: str) -> Checks:
        for key in keys:
            if not self._number(key) >= 0:
                self._fail(key, ">= 0")
        return self

    def at_least(self, minimum: int, *keys: str) -> Checks:
        """Whole numbers >= minimum (counts such as epochs or batch sizes)."""
        for key in keys:
            value = self._number(key)
            if not (float(value).is_integer() and value >= minimum):
                self._fail(key, f"a whole number >= {minimum}")
        return self

    def within(self, key: str, low: float, high: float, high_open: bool = False) -> Checks:
        value = self._number(key)
        if not (low <= value and (value < high if high_open else value <= high)):
            self._fail(key, f"in [{low}, {high}{')' if high_open else ']'}")
        return self

    def one_of(self, key: str, options: Iterable[str]) -> Checks:
        if self.section[key] not in tuple(options):
            self._fail(key, f"one of {tuple(options)}")
        return self

    def registered(self, key: str, registry: Registry, own: bool = False) -> Checks:
        """`key` names a variant of `registry`: one of its names ("must be one of (...), got x (did you mean
        y?)"), or with `own` also the user's own function by dotted path or {_target_: path, ...}, imported
        now so that a missing one fails before anything slow starts (Registry.check)."""
        value = self.section[key]
        if own and (OmegaConf.is_dict(value) or (isinstance(value, str) and "." in value)):
            registry.check(OmegaConf.to_container(value) if OmegaConf.is_dict(value) else value)
            return self
        if not (isinstance(value, str) and value in registry):
            close = difflib.get_close_matches(str(value), registry.names(), n=1, cutoff=0.6)
            allowed = f"one of {registry.names()}" + (" or a dotted path to your own function" if own else "")
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise ConfigError(f"{self.prefix}.{key} must be {allowed}, got {value!r}{hint}")
        return self


def check_kl_loss(algorithm: DictConfig, in_loss: bool, needs: str) -> None:
    """PPO's and GRPO's `kl_estimator` (registered: checked before) and `use_bias_correction_kl` for the KL to
    the reference as a loss term; `in_loss`: whether this configuration has that term, `needs`: what gives it.
    Warns where the term's gradient is zero in expectation (k1: OpenRLHF warns the same).

    Raises:
        ConfigError: use_bias_correction_kl without the loss term, or with an estimator the importance ratio
        does not correct (alignlab.losses.rlhf.kl_loss_gradient).
    """
    corrected = algorithm.use_bias_correction_kl
    if corrected and not in_loss:
        raise ConfigError(f"algorithm.use_bias_correction_kl=true weights the KL loss term, which needs {needs}")
    try:
        gradient = kl_loss_gradient(algorithm.kl_estimator, corrected)
    except ValueError as e:
        raise ConfigError(f"algorithm.{e}") from None
    if in_loss and gradient == "zero":
        log.warning(
            f"algorithm.kl_estimator={algorithm.kl_estimator} as a loss term has no gradient in expectation; k2, k1+ "
            "or k3+ (or use_bias_correction_kl=true) descend KL(π ‖ π_ref) (docs/algorithms.md)"
        )
