"""Read a sweep back into pandas: `load_sweep` gives one row per run, `load_history` every logged value
in long form. Both read a local multirun folder (or one run folder) or a W&B group.

    from alignlab.results import load_sweep, load_history
    runs = load_sweep("multirun/demo-2026-11-25_10-00-00")     # or "entity/project/group" on W&B
    curves = load_history("multirun/demo-2026-11-25_10-00-00")

A run row holds: `run` (its folder, relative to the sweep), the overridden hyper-parameters (one
column per key, typed), `algorithm` and `seed`, `status` and `finished`, the final metrics under their logged names
(`eval/exact_match`, `train/loss`, …), the best value each eval metric reached during the run under
`best/<name>` (the lowest for losses and KL, the highest otherwise), `steps`, `seconds`, `run_dir`
and the W&B `wandb_id` and `wandb_group`.

A relative folder is found as the user means it (`resolve_sweep`: also from the directory the command
ran in, or a folder above, as for a notebook whose kernel runs in `notebooks/`), and `plot_axes` picks
what to plot a sweep's metrics against from what it varied (`varied_keys`).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from alignlab.errors import AlignlabError
from alignlab.runner.sweeps import STOPPED_FILES, split_override

# Folders inside a run that hold config.yaml files of their own.
_NOT_RUNS = {"wandb", ".hydra", "model", "checkpoints", "adapter"}
_WANDB_PATH = re.compile(r"^(wandb:)?[\w.-]+/[\w.-]+/[^/]+$")


class SweepError(AlignlabError):
    """A sweep that cannot be read: missing, empty, or with runs that have not finished."""


def lower_is_better(metric: str) -> bool:
    """Losses and KL divergences improve downwards; accuracies, rewards and margins upwards."""
    name = metric.rsplit("/", 1)[-1]
    return "loss" in metric or name == "kl" or metric.endswith("/kl")


def parse_override(text: str) -> tuple[str, Any]:
    """`key=value` from a Hydra override line, the value typed as YAML reads it (0.1 → float)."""
    key, value = split_override(text)
    try:
        return key, yaml.safe_load(value)
    except yaml.YAMLError:
        return key, value


def overrides_dict(lines: Iterable[str]) -> dict[str, Any]:
    """The hyper-parameters a run was given on the command line or by the sweeper (Hydra's own
    settings and the choice of sweep config left out)."""
    pairs = (parse_override(line) for line in lines if "=" in line)
    return {k: v for k, v in pairs if not k.startswith("hydra.") and k != "sweep"}


# -- local folders --------------------------------------------------------------------------------
def _natural_key(path: Path) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", str(path))]


def run_folders(root: Path) -> list[Path]:
    """Every run folder under `root` (a folder holding the resolved config.yaml a run writes first),
    `root` itself when it is one run; in job-number order."""
    found = {p.parent for p in root.rglob("config.yaml")}
    found |= {p.parent.parent for p in root.rglob(".hydra/overrides.yaml")}
    runs = [f for f in found if not _NOT_RUNS & set(f.relative_to(root).parts) and f.name not in _NOT_RUNS]
    return sorted(runs, key=_natural_key)


def _read_run(folder: Path, root: Path) -> dict:
    config = yaml.safe_load((folder / "config.yaml").read_text()) if (folder / "config.yaml").exists() else {}
    summary_path = folder / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else None
    overrides_file = folder / ".hydra" / "overrides.yaml"
    if summary and "overrides" in summary:
        lines = summary["overrides"]
    elif overrides_file.exists():
        lines = yaml.safe_load(overrides_file.read_text()) or []
    else:
        lines = []
    wandb = (summary or {}).get("wandb") or {}
    return {
        "run": str(folder.relative_to(root)) if folder != root else folder.name,
        "overrides": overrides_dict(lines),
        "algorithm": (config.get("algorithm") or {}).get("name"),
        "seed": config.get("seed"),
        "finished": summary is not None,
        "status": _local_status(folder, summary is not None),
        "metrics": (summary or {}).get("metrics", {}),
        "steps": (summary or {}).get("steps"),
        "seconds": (summary or {}).get("seconds"),
        "run_dir": str(folder),
        "wandb_id": wandb.get("id"),
        "wandb_group": wandb.get("group"),
        "history": _read_metrics_csv(folder / "metrics.csv"),
    }


def _local_status(folder: Path, finished: bool) -> str:
    """finished (summary.json), failed or interrupted (the file train() leaves, see STOPPED_FILES), or
    incomplete: still running, or killed without a trace."""
    if finished:
        return "finished"
    return next((s for s, name in STOPPED_FILES.items() if (folder / name).is_file()), "incomplete")


def _read_metrics_csv(path: Path) -> pd.DataFrame:
    """Long form (step, metric, value) of a run's metrics file; empty when there is none yet."""
    if not path.exists():
        return pd.DataFrame(columns=["step", "metric", "value"])
    wide = pd.read_csv(path)
    long = wide.drop(columns=[c for c in ("epoch",) if c in wide]).melt(
        id_vars="step", var_name="metric", value_name="value"
    )
    return long.dropna(subset=["value"]).astype({"step": int}).reset_index(drop=True)


def _local_runs(root: Path) -> list[dict]:
    folders = run_folders(root)
    if not folders:
        raise SweepError(
            f"no runs found in {root}: a sweep folder holds one folder per job, each with the config.yaml "
            "every run writes first (is this the multirun folder?)"
        )
    return [_read_run(folder, root) for folder in folders]


# -- W&B ------------------------------------------------------------------------------------------
def _wandb_runs(path: str, api=None) -> list[dict]:
    entity, project, group = path.removeprefix("wandb:").split("/")
    if api is None:
        import wandb

        api = wandb.Api()
    runs = list(api.runs(f"{entity}/{project}", filters={"group": group}))
    if not runs:
        raise SweepError(f"no W&B runs in {entity}/{project} with group {group!r}")
    out = []
    for run in runs:
        config = dict(run.config)
        summary = {k: v for k, v in dict(run.summary).items() if not k.startswith("_")}
        history = run.history(samples=100_000, pandas=True)
        step = "trainer/global_step" if "trainer/global_step" in history else "_step"
        metrics = [c for c in history if not c.startswith("_") and c not in ("trainer/global_step", "epoch")]
        long = history[[step, *metrics]].rename(columns={step: "step"}).melt(id_vars="step", var_name="metric")
        long = long.dropna(subset=["value"]).astype({"step": int}).reset_index(drop=True)
        out.append(
            {
                "run": run.name,
                "overrides": overrides_dict(config.get("overrides") or []),
                "algorithm": (config.get("algorithm") or {}).get("name"),
                "seed": config.get("seed"),
                "finished": run.state == "finished",
                "status": run.state,
                "metrics": {k: v for k, v in summary.items() if isinstance(v, int | float) and "/" in k},
                "steps": summary.get("trainer/global_step"),
                "seconds": summary.get("_runtime"),
                "run_dir": run.url,
                "wandb_id": run.id,
                "wandb_group": run.group,
                "history": long,
            }
        )
    return out


# -- both -----------------------------------------------------------------------------------------
def resolve_sweep(source: str | Path) -> Path | str:
    """The sweep `source` names, read as the user means it: a folder, or else a W&B group.

    A path that exists from the current directory is that folder. A relative one that does not is
    looked for from the directory the command was started in (the shell's `$PWD`: a Jupyter kernel
    inherits it but runs in the notebook's folder, so `ALIGNLAB_SWEEP=multirun/<time>` given at the
    repository root names `<root>/multirun/<time>` while the kernel sits in `notebooks/`), then from
    each folder above the current one. A folder found there comes back absolute; otherwise an
    `entity/project/group` text (`wandb:` prefix allowed) comes back as it is, for the W&B API.

    Raises:
        SweepError: neither a folder anywhere tried nor a W&B path; the message lists the folders tried.
    """
    path = Path(source)
    if path.exists():
        return path
    tried = [Path.cwd()]
    if not path.is_absolute():
        shell = os.environ.get("PWD")
        bases = ([Path(shell)] if shell else []) + list(Path.cwd().parents)
        for base in bases:
            if base not in tried:
                tried.append(base)
                if (base / path).exists():
                    return (base / path).absolute()
    if isinstance(source, str) and _WANDB_PATH.match(source):
        return source
    raise SweepError(
        f"{source} is neither a folder nor a W&B path (entity/project/group); looked for the folder from "
        f"{', '.join(str(b) for b in tried)}. Give the multirun folder's absolute path, or its path from one of these"
    )


def _runs(source: str | Path, allow_unfinished: bool, api=None) -> list[dict]:
    found = resolve_sweep(source)
    runs = _local_runs(found) if isinstance(found, Path) else _wandb_runs(found, api)
    unfinished = [f"{r['run']} ({r['status']})" for r in runs if not r["finished"]]
    if unfinished and not allow_unfinished:
        raise SweepError(
            f"{len(unfinished)} of {len(runs)} runs in {source} have not finished: {', '.join(unfinished)}. "
            "Wait for them, or pass allow_unfinished=True to get them as rows with finished=False."
        )
    return runs


def _base_row(run: dict, keys: list[str]) -> dict:
    row = {"run": run["run"]}
    row.update({k: run["overrides"].get(k) for k in keys})
    for key in ("algorithm", "seed", "status"):
        row.setdefault(key, run[key])
    return row


def _override_keys(runs: list[dict]) -> list[str]:
    keys: list[str] = []
    for run in runs:
        keys += [k for k in run["overrides"] if k not in keys]
    return keys


def load_sweep(source: str | Path, allow_unfinished: bool = False, api=None) -> pd.DataFrame:
    """One row per run of a sweep (a local multirun folder, one run folder, or `entity/project/group`
    on W&B). Unfinished runs raise a SweepError that lists them, unless `allow_unfinished`."""
    runs = _runs(source, allow_unfinished, api)
    keys = _override_keys(runs)
    rows = []
    for run in runs:
        row = _base_row(run, keys)
        row["finished"] = run["finished"]
        row.update(run["metrics"])
        history = run["history"]
        for metric, values in history[history.metric.str.startswith("eval/")].groupby("metric")["value"]:
            row[f"best/{metric}"] = values.min() if lower_is_better(metric) else values.max()
        row.update({k: run[k] for k in ("steps", "seconds", "run_dir", "wandb_id", "wandb_group")})
        rows.append(row)
    return pd.DataFrame(rows)


def load_history(source: str | Path, allow_unfinished: bool = False, api=None) -> pd.DataFrame:
    """Every logged value of every run in long form: run, the overridden hyper-parameters, algorithm,
    seed, status, step, metric, value. Unfinished runs are handled as in `load_sweep`."""
    runs = _runs(source, allow_unfinished, api)
    keys = _override_keys(runs)
    frames = []
    for run in runs:
        history = run["history"].copy()
        for key, value in reversed(_base_row(run, keys).items()):
            history.insert(0, key, [value] * len(history))
        frames.append(history)
    return pd.concat(frames, ignore_index=True)


# -- what a sweep varied ---------------------------------------------------------------------------
_RUN_COLUMNS = {"run", "status", "finished", "steps", "seconds", "run_dir", "wandb_id", "wandb_group", "seed"}


def varied_keys(runs: pd.DataFrame) -> list[str]:
    """The hyper-parameters that take more than one value across `load_sweep`'s rows, in column order:
    the overridden keys (`algorithm.beta`, `optim.lr`, …) and `algorithm`; the seed is left out (it
    repeats a setting, it does not change it), and so are metrics (their names hold a `/`)."""
    keys = [c for c in runs.columns if c not in _RUN_COLUMNS and "/" not in c]
    return [k for k in keys if runs[k].dropna().astype(str).nunique() > 1]


def is_numeric(values: pd.Series) -> bool:
    """Whether a hyper-parameter's values are numbers to place on a scale (True/False are names)."""
    return pd.api.types.is_numeric_dtype(values) and not pd.api.types.is_bool_dtype(values)


def plot_axes(runs: pd.DataFrame, x: str | None = None) -> tuple[str, list[str]]:
    """(the key for the x axis, the keys that tell the plotted lines apart) for `load_sweep`'s rows.

    `x` given: that key, every other varied key (`varied_keys`) separating lines. None: the first varied
    key whose values are numbers (β before the algorithm's name), else the first varied key, else
    `seed` when only the seed varied, else `run`.

    Raises:
        SweepError: `x` is not a column of `runs`.
    """
    varied = varied_keys(runs)
    if x is None:
        numeric = [k for k in varied if is_numeric(runs[k])]
        seeds = "seed" in runs and runs["seed"].nunique() > 1
        x = (numeric or varied or ["seed" if seeds else "run"])[0]
    elif x not in runs:
        raise SweepError(f"{x} is not a column of the sweep; the keys it varied: {', '.join(varied) or 'none'}")
    return x, [k for k in varied if k != x]
