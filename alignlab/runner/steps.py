"""A run that would take no optimizer step stops before it writes anything.

Such a run used to finish normally ("finished 0 steps", exit 0) with the starting model exported as if
trained: a trainer told to take no step (`trainer.max_steps=0`, `max_epochs=0`,
`limit_train_batches=0`), or a train split with fewer usable rows than one optimizer step takes (online
algorithms leave out a last batch smaller than `batch_size` prompts; every algorithm needs one row per
process). Known once the data is set up (rows left out as too long or bad counted), before the resolved
config is saved.
"""

from __future__ import annotations

import os

from omegaconf import DictConfig, OmegaConf

from alignlab.errors import ConfigError


def expected_processes(trainer: DictConfig) -> int:
    """The processes the trainer will run (`devices` × `num_nodes`), as far as the config says before
    Lightning starts: WORLD_SIZE where a launcher set it, an explicit count or list of devices, the
    visible CUDA GPUs for `-1`/`auto` on a GPU accelerator, else 1 (a lower bound: never more than run)."""
    if os.environ.get("WORLD_SIZE", "").isdigit():
        return max(1, int(os.environ["WORLD_SIZE"]))
    devices, nodes = trainer.get("devices", 1), trainer.get("num_nodes", 1) or 1
    if OmegaConf.is_list(devices) or isinstance(devices, (list, tuple)):
        count = len(devices)
    elif isinstance(devices, str) and devices.strip().isdigit():
        count = int(devices)
    elif isinstance(devices, str) and "," in devices:
        count = len([d for d in devices.split(",") if d.strip()])
    elif isinstance(devices, int) and devices > 0:
        count = devices
    elif trainer.get("accelerator") in ("gpu", "cuda"):
        import torch

        count = torch.cuda.device_count() or 1
    else:
        count = 1
    return max(1, count) * (nodes if isinstance(nodes, int) and nodes > 0 else 1)


def check_trainer_steps(trainer: DictConfig) -> None:
    """trainer.max_steps, max_epochs or limit_train_batches set to 0: no optimizer step would be taken.

    Raises:
        ConfigError: naming the key.
    """
    for key, what in (
        ("max_steps", "optimizer steps"),
        ("max_epochs", "passes over the data"),
        ("limit_train_batches", "batches of each epoch"),
    ):
        value = trainer.get(key)
        if value is not None and not isinstance(value, bool) and value == 0:
            raise ConfigError(
                f"trainer.{key}=0 allows no {what}, so the run would take no optimizer step and export the starting "
                "model as if trained; set it above 0 (trainer.max_steps counts optimizer steps; -1 trains by "
                "trainer.max_epochs)"
            )


def check_optimizer_steps(cfg: DictConfig, datamodule) -> None:
    """Refuse a run that would take no optimizer step: `check_trainer_steps`, then the train split's
    usable rows (after setup: rows left out as too long or bad are not counted) against the rows one
    optimizer step takes: `batch_size` × processes for an algorithm that leaves out a short last batch
    (online ones: `drop_last_train`; × trainer.accumulate_grad_batches under a token budget, whose steps
    are whole), one row per process otherwise. A stream is counted only when it was read whole.

    Raises:
        ConfigError: naming batch_size, the rows kept and why others were left out.
    """
    check_trainer_steps(cfg.trainer)
    kept = usable_train_rows(datamodule)
    if kept is None:  # longer than what was read to check it: at least one step's worth is not known yet
        return
    processes = expected_processes(cfg.trainer)
    if not datamodule.drop_last_train:
        needed = processes
    else:
        accumulate = cfg.trainer.get("accumulate_grad_batches", 1) if datamodule.max_tokens_per_micro_batch else 1
        needed = datamodule.batch_size * processes * (accumulate if isinstance(accumulate, int) else 1)
    if kept < needed:
        raise ConfigError(no_step_message(cfg, datamodule, kept, needed, processes))


def usable_train_rows(datamodule) -> int | None:
    """The train split's rows left after setup; for a stream, those of the part read to check it (None
    when the stream is longer than that)."""
    if datamodule.stream is not None:
        return datamodule.stream_usable_rows
    return len(datamodule.splits.get("train") or [])


def no_step_message(cfg: DictConfig, datamodule, kept: int, needed: int, processes: int) -> str:
    """Why the run would take no optimizer step: the rows one step takes, the rows kept and why the others
    were left out, and what to change."""
    per_step = f"batch_size={datamodule.batch_size}" if datamodule.drop_last_train else "one row"
    if processes > 1:
        per_step += f" × {processes} processes"
    if needed != datamodule.batch_size * processes and datamodule.drop_last_train:
        per_step += f" × trainer.accumulate_grad_batches={needed // (datamodule.batch_size * processes)}"
    fit = kept // max(1, needed // datamodule.batch_size) if datamodule.drop_last_train else 0
    advice = f"lower batch_size to {fit} or less, or give more rows" if fit else "give more rows"
    if datamodule.dropped.get("train"):
        advice += " (or raise max_length to keep the rows left out)"
    algorithm = cfg.algorithm.get("name", "this algorithm")
    return (
        f"the run would take no optimizer step: the data has {rows_account(datamodule, kept)}, and one optimizer "
        f"step of algorithm={algorithm} takes {per_step} rows"
        + (" (a last batch smaller than that is left out)" if datamodule.drop_last_train else "")
        + f"; {advice}"
    )


def rows_account(datamodule, kept: int) -> str:
    """'<kept> usable training rows of <read> read; <n> left out at max_length=… (…); <n> skipped as bad'."""
    read = datamodule.read().get("train")
    total = len(read) if isinstance(read, list) else None
    left_out = []
    if datamodule.dropped.get("train"):
        reasons = ", ".join(f"{n} {why}" for why, n in datamodule.dropped_by_reason.get("train", {}).items())
        left_out.append(f"{datamodule.dropped['train']} left out at max_length={datamodule.max_length} ({reasons})")
    if datamodule.skipped.get("train"):
        left_out.append(f"{datamodule.skipped['train']} skipped as bad (data.on_bad_row=skip)")
    rows = f"{kept} usable training row{'s' if kept != 1 else ''}"
    if total is not None and total != kept:
        rows += f" of {total} read"
    if left_out:
        rows += f"; {'; '.join(left_out)}"
    return rows
