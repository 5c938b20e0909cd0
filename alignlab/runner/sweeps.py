"""What a run is called. A single run: `<algorithm>-<starting model>` plus the overrides that differ
from the defaults (`dpo-tiny-beta=0.5`), which also names its folder (`…_dpo-tiny-beta-0.5`, by the
`alignlab.run_name` resolver in conf/hydra/default.yaml). A job of a Hydra multirun: the values it
was given for the swept keys, grouped on W&B under the sweep's name. And how a run folder says its
training stopped early (STOPPED_FILES)."""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml
from omegaconf import DictConfig, OmegaConf, open_dict

from alignlab.runner.preflight import CONFIG_DIR, load_option
from alignlab.runner.redact import SECRET_KEY, redact_text


@dataclass(frozen=True)
class SweepJob:
    """One job of a sweep, as `current_job` reads it from Hydra: what names its run and its group."""

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


# Files that mark a run folder whose training stopped early, by status: FAILED (an error, its message
# inside) or INTERRUPTED (a signal; resumable with resume=auto). A finished run has summary.json instead.
STOPPED_FILES = {"failed": "FAILED", "interrupted": "INTERRUPTED"}
# What Hydra writes into a run folder before alignlab's code runs: its record and the job's log file.
HYDRA_FILES = (".hydra", "alignlab.log")
# What a run folder holds once training has begun (or ended): it is kept whatever happens next.
TRAINED_FILES = ("checkpoints", "summary.json", *STOPPED_FILES.values())


def holds_only_hydra_files(run_dir: Path) -> bool:
    """True when `run_dir` holds nothing but what Hydra writes as a job starts (HYDRA_FILES)."""
    return run_dir.is_dir() and all(p.name in HYDRA_FILES for p in run_dir.iterdir())


def is_first_process() -> bool:
    """True outside distributed runs and in their global rank 0 (the process that owns the run folder),
    read from the launchers' environment (torchrun, Lightning's DDP launcher, SLURM) before any is set up."""
    return all(os.environ.get(name, "0") == "0" for name in ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID"))


def _inside(path: str, folder: Path) -> bool:
    return Path(path).resolve().is_relative_to(folder)


def discard_unstarted_run(run_dir: Path) -> bool:
    """Remove the run folder of a command that failed before training began, so that mistakes leave
    no folders behind. Call it only for a folder this job created (held only HYDRA_FILES when the job
    began, see holds_only_hydra_files); one that holds a checkpoint, summary or stop mark (TRAINED_FILES)
    is kept, as are the working directory and its parents. Returns whether the folder was removed."""
    run_dir = run_dir.resolve()
    cwd = Path.cwd().resolve()
    if not run_dir.is_dir() or run_dir == cwd or run_dir in cwd.parents:
        return False
    if any((run_dir / name).exists() for name in TRAINED_FILES):
        return False
    for logger in (logging.getLogger(), *logging.Logger.manager.loggerDict.values()):  # the job's log file
        for handler in list(getattr(logger, "handlers", [])):
            if isinstance(handler, logging.FileHandler) and _inside(handler.baseFilename, run_dir):
                handler.close()
                logger.removeHandler(handler)
    shutil.rmtree(run_dir, ignore_errors=True)
    return not run_dir.exists()


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


# Overrides a run name leaves out: what the name already says (algorithm and starting model) and the
# name itself ...
NAMED_ELSEWHERE = ("algorithm", "model", "model.path", "model.tiny", "model.name", "run_name")
# ... and keys (with everything under them) that decide where a run writes, how it reports and what it
# measures, not what it trains.
NOT_TRAINING = (
    "hydra",
    "paths",
    "logger",
    "callbacks",
    "evaluation",
    "sweep",
    "resume",
    "save_model",
    "objective",
    "trainer.enable_progress_bar",
    "trainer.enable_model_summary",
    "trainer.log_every_n_steps",
)
MAX_NAME = 100  # characters of a run name made from overrides; longer ones end in a hash of the rest
_UNSAFE = re.compile(r"[^\w.=,+-]")  # anything else (/, spaces, brackets, quotes) becomes _ in a name
_FOLDER_CHARS = str.maketrans("=,", "-+")


def _default_option(group: str, choices: dict) -> str | None:
    """The option a group takes without an override: the chosen algorithm's `override /group`, else
    conf/train.yaml's defaults list."""
    files = [CONFIG_DIR / "algorithm" / f"{choices.get('algorithm')}.yaml", CONFIG_DIR / "train.yaml"]
    for path in files:
        for entry in OmegaConf.load(path).get("defaults") or [] if path.is_file() else []:
            for name, option in entry.items() if OmegaConf.is_dict(entry) else []:
                if name.split("/")[-1].split("@")[0] == group:
                    return option
    return None


def file_default(key: str, choices: dict):
    """The value the config files give `key` before overrides: `group.rest` from
    conf/<group>/<choice>.yaml and the partials it includes (preflight.load_option), a top-level key
    from conf/train.yaml, a group's option from the defaults lists. Raises KeyError when no file says
    (overlays such as `hardware=gpu`, `@package _global_`, are not consulted)."""
    group, _, rest = key.partition(".")
    if (CONFIG_DIR / group).is_dir() and not rest:
        return _default_option(group, choices)
    path = CONFIG_DIR / group / f"{choices.get(group)}.yaml"
    # an option's keys with those of the partials it includes (conf/_partials/: data.shuffle, algorithm.use_vllm)
    option = bool(rest) and path.is_file()
    node = OmegaConf.to_container(
        load_option(group, path.stem) if option else OmegaConf.load(CONFIG_DIR / "train.yaml")
    )
    for part in (rest if option else key).split("."):
        if not isinstance(node, dict) or part not in node:
            raise KeyError(key)
        node = node[part]
    return node


def changed_overrides(lines: Sequence[str], choices: dict) -> list[str]:
    """`key=value` of the overrides that change what a run trains, in command-line order. Left out:
    keys named elsewhere or not about training (NAMED_ELSEWHERE, NOT_TRAINING), secret-looking
    keys or values, and values equal to the config files' default (see `file_default`). Each key goes
    without its group where that is unambiguous (`algorithm.beta` → `beta`, `model.lora.r` → `lora.r`)."""
    kept = []
    for line in lines:
        key, value = split_override(line)
        if "=" not in line or line.startswith("~") or key in NAMED_ELSEWHERE:
            continue
        if any(key == k or key.startswith(k + ".") for k in NOT_TRAINING):
            continue
        if SECRET_KEY.search(key.rsplit(".", 1)[-1]) or redact_text(line) != line:
            continue  # a secret never reaches a folder or W&B name
        try:
            if yaml.safe_load(value) == file_default(key, choices):
                continue
        except (KeyError, yaml.YAMLError):
            pass
        kept.append((key, value))
    short = [k.split(".", 1)[-1] for k, _ in kept]
    return [f"{s if short.count(s) == 1 else k}={v}" for (k, v), s in zip(kept, short)]


def safe_name(text: str) -> str:
    """`text` as one file name: characters other than letters, digits and `._=,+-` become `_`; past
    MAX_NAME characters it is cut and ends in `_` and 8 hex digits of the whole text's hash, so names
    stay apart."""
    clean = _UNSAFE.sub("_", text)
    if len(clean) <= MAX_NAME:
        return clean
    return f"{clean[: MAX_NAME - 9]}_{hashlib.sha1(text.encode()).hexdigest()[:8]}"


def folder_name(name: str) -> str:
    """A run name as the last part of its folder: `safe_name` with `=` written `-` and `,` written `+`
    (`dpo-tiny-beta-0.5+seed-1`), since a folder is given back on the command line
    (`hydra.run.dir=…`, `model.path=…/model`), where Hydra reads `=` and `,` as syntax."""
    return safe_name(name).translate(_FOLDER_CHARS)


def default_name(cfg: DictConfig, overrides: Sequence[str], choices: dict) -> str:
    """`<algorithm>-<starting model>[-<changed overrides>]`, e.g. `dpo-tiny`, `dpo-tiny-beta=0.5,seed=1`."""
    changed = ",".join(changed_overrides(overrides, choices))
    return safe_name("-".join(p for p in (str(cfg.algorithm.name), model_label(cfg.model), changed) if p))


def hydra_overrides() -> tuple[list[str], dict]:
    """This job's overrides and group choices; nothing outside a Hydra app."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return [], {}
    hc = HydraConfig.get()
    return list(hc.overrides.task), dict(hc.runtime.choices)


def run_folder_name(*, _root_: DictConfig) -> str:
    """The `alignlab.run_name` resolver (conf/hydra/default.yaml's run folder): `run_name` when set,
    else `default_name` from the Hydra config composed with it, as a folder name (`folder_name`)."""
    if _root_.get("run_name") is not None:
        return folder_name(str(_root_.run_name))
    hydra = _root_.hydra
    try:
        return folder_name(default_name(_root_, list(hydra.overrides.task), dict(hydra.runtime.choices)))
    except Exception:  # e.g. model.path=???: alignlab's config checks say what is wrong, once the job starts
        return "run"


def dpo_loss_types_grid() -> str:
    """The `alignlab.dpo_loss_types` resolver (conf/sweep/dpo_loss_types.yaml's grid): every registered DPO
    loss type that needs no other setting (all but those needing label_smoothing > 0), comma-separated,
    so a loss type registered in alignlab/losses/dpo.py joins the comparison without editing the sweep."""
    from alignlab.losses.dpo import DPO_LOSSES

    return ",".join(DPO_LOSSES.names(needs_label_smoothing=False))


def register_resolvers() -> None:
    """Make `${alignlab.run_name:}` (Hydra resolves it as it creates a run folder) and
    `${alignlab.dpo_loss_types:}` (a sweep grid) known to OmegaConf."""
    if not OmegaConf.has_resolver("alignlab.run_name"):
        OmegaConf.register_new_resolver("alignlab.run_name", run_folder_name)
    if not OmegaConf.has_resolver("alignlab.dpo_loss_types"):
        OmegaConf.register_new_resolver("alignlab.dpo_loss_types", dpo_loss_types_grid)


def name_run(
    cfg: DictConfig, job: SweepJob | None, overrides: Sequence[str] | None = None, choices: dict | None = None
) -> None:
    """Fill `run_name` unless the command line set it: in a sweep, the job's overrides; otherwise
    `default_name` over `overrides` and group `choices` (this Hydra job's when None). In a sweep W&B
    also groups the run under the sweep, unless `logger.wandb.group` is set."""
    with open_dict(cfg):
        if cfg.get("run_name") is None:
            if job is not None:
                cfg.run_name = job.name
            else:
                found = hydra_overrides() if overrides is None else (list(overrides), dict(choices or {}))
                cfg.run_name = default_name(cfg, *found)
        if job is None:
            return
        wandb = (cfg.get("logger") or {}).get("wandb")
        if wandb is not None and wandb.get("group") is None:
            wandb.group = job.group
