"""What a job knows about the Hydra multirun it belongs to: the sweep's name (the W&B group every job
shares) and the job's own name, made of the values it was given for the swept keys."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml
from omegaconf import DictConfig, OmegaConf, open_dict


@dataclass(frozen=True)
class SweepJob:
    group: str  # e.g. "dpo_beta-2026-11-25_10-00-00": the sweep config (or "multirun") and the sweep folder
    name: str  # e.g. "algorithm.beta=0.1,seed=0"
    num: int  # the job's number in the sweep
    given: dict  # every override this job was given (command line and sweeper), as text


def split_override(line: str) -> tuple[str, str]:
    """(key, value text) of a Hydra override line; `+key` (add) and `~key` (delete) give `key`."""
    key, _, value = line.partition("=")
    return key.lstrip("+~"), value


def swept_keys(sweep_dir: Path, sweeper_params: dict | None) -> list[str]:
    """Keys the sweep varies: the sweeper's `params` plus command-line overrides with sweep syntax
    (`a=1,2`, `range(…)`), read from the multirun.yaml Hydra writes before launching jobs."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    keys = list(sweeper_params or {})
    multirun = sweep_dir / "multirun.yaml"
    if multirun.exists():
        task = OmegaConf.load(multirun).hydra.overrides.task
        for override in OverridesParser.create().parse_overrides(list(task)):
            if override.is_sweep_override() and override.key_or_group not in keys:
                keys.append(override.key_or_group)
    return keys


def current_job() -> SweepJob | None:
    """The running job's place in its sweep; None outside a Hydra multirun."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return None
    hc = HydraConfig.get()
    if hc.mode != RunMode.MULTIRUN:
        return None
    sweep_dir = Path(hc.sweep.dir)
    params = OmegaConf.to_container(hc.sweeper.params) if hc.sweeper.get("params") else None
    keys = swept_keys(sweep_dir, params)
    given = dict(split_override(o) for o in hc.overrides.task if "=" in o)
    shown = [f"{k}={given[k]}" for k in keys if k in given] or [f"{k}={v}" for k, v in given.items()]
    sweep = hc.runtime.choices.get("sweep") or "multirun"
    name = ",".join(shown) or f"job{hc.job.num}"
    return SweepJob(group=f"{sweep}-{sweep_dir.name}", name=name, num=hc.job.num, given=given)


# Folders a run writes its exported model into (alignlab.models.export.save_model).
EXPORT_FOLDERS = ("model", "adapter")


def model_label(model_cfg: DictConfig) -> str:
    """What a run name says about the starting model.

    The embedded model: its config name (`tiny`). A folder or Hub id: its last path part
    (`Qwen2.5-0.5B-Instruct`, `my-sft-copy`). A run's export (`<run>/model`, `<run>/adapter`) is
    named after that run: its `run_name` from `summary.json` or `config.yaml` (`sft-tiny`), else the
    run folder's name.
    """
    if model_cfg.get("tiny"):
        return str(model_cfg.name)
    path = Path(str(model_cfg.path)).expanduser()
    if path.name not in EXPORT_FOLDERS or not path.is_dir():
        return path.name or str(model_cfg.path)
    run_dir = path.resolve().parent
    for record in (run_dir / "summary.json", run_dir / "config.yaml"):
        if record.is_file():
            name = (yaml.safe_load(record.read_text()) or {}).get("run_name")  # JSON is YAML too
            if isinstance(name, str) and name:
                return str(name)
    return run_dir.name


def name_run(cfg: DictConfig, job: SweepJob | None) -> None:
    """Fill `run_name` unless the command line set it: in a sweep, the job's overrides; otherwise
    `<algorithm>-<starting model>` (see `model_label`). In a sweep W&B also groups the run under the
    sweep, unless `logger.wandb.group` is set."""
    with open_dict(cfg):
        if cfg.get("run_name") is None:
            cfg.run_name = job.name if job is not None else f"{cfg.algorithm.name}-{model_label(cfg.model)}"
        if job is None:
            return
        wandb = (cfg.get("logger") or {}).get("wandb")
        if wandb is not None and wandb.get("group") is None:
            wandb.group = job.group
