"""Strategy builders for hardware profiles that need more than a class and its arguments."""

from __future__ import annotations

import importlib.util
from typing import Any

import torch
from omegaconf import DictConfig

from alignlab.errors import ConfigError


class TransformerBlocks:
    """An FSDP auto-wrap policy: every module whose class a Hugging Face model in the tree lists in
    `_no_split_modules` (its transformer block, e.g. Qwen2DecoderLayer) becomes its own shard unit,
    whatever the architecture. FSDP visits a parent (recurse=True) before its children, so the names
    are known before the blocks are reached."""

    def __init__(self):
        self.names: set[str] = set()

    def __call__(self, module: torch.nn.Module, recurse: bool, nonwrapped_numel: int) -> bool:
        if recurse:
            self.names.update(getattr(module, "_no_split_modules", None) or ())
            return True
        return type(module).__name__ in self.names


def fsdp_strategy(**kwargs: Any):
    """Lightning's FSDPStrategy, sharding per transformer block (see TransformerBlocks)."""
    from lightning.pytorch.strategies import FSDPStrategy

    return FSDPStrategy(auto_wrap_policy=TransformerBlocks(), **kwargs)


def deepspeed_strategy(**kwargs: Any):
    """Lightning's DeepSpeedStrategy (ZeRO stage 2 or 3); DeepSpeed itself is an optional install."""
    from lightning.pytorch.strategies import DeepSpeedStrategy

    return DeepSpeedStrategy(**kwargs)


def check_hardware(trainer: DictConfig, choice: str | None = None) -> None:
    """What a hardware profile (`choice`, e.g. "gpu") needs that can be checked before any model loads.

    Raises:
        ConfigError: a GPU profile on a machine where torch finds no CUDA GPU, DeepSpeed not
            installed, or a ZeRO stage that does not exist.
    """
    strategy = trainer.get("strategy")
    name = strategy.get("_target_", "") if isinstance(strategy, DictConfig) else str(strategy or "")
    if "deepspeed" in name and importlib.util.find_spec("deepspeed") is None:
        raise ConfigError(
            "hardware=deepspeed (trainer.strategy) needs DeepSpeed: pip install deepspeed, on a CUDA machine"
        )
    if isinstance(strategy, DictConfig) and strategy.get("stage") is not None and strategy.stage not in (1, 2, 3):
        raise ConfigError(f"trainer.strategy.stage must be one of (1, 2, 3), got {strategy.stage!r}")
    accelerator = trainer.get("accelerator")
    mps = accelerator == "gpu" and torch.backends.mps.is_available()  # Lightning's "gpu" is Apple's GPU there
    if accelerator in ("gpu", "cuda") and not (torch.cuda.is_available() or mps):
        profile = f"hardware={choice}" if choice else "this hardware profile"
        raise ConfigError(
            f"{profile} (trainer.accelerator={trainer.accelerator}) needs a CUDA GPU, and torch finds none on this "
            "machine; use hardware=cpu, or hardware=ddp_cpu for data parallel in CPU processes"
        )
