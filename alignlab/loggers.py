"""Logger factories. W&B goes offline by itself when no API key is available."""

from __future__ import annotations

import logging
import netrc
import os

log = logging.getLogger(__name__)
_said_offline = False  # a sweep's jobs share one process: say it once


def wandb_api_key_available() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


def wandb_logger(
    project: str,
    name: str,
    save_dir: str,
    entity: str | None = None,
    group: str | None = None,
    tags: list | None = None,
    offline: bool | None = None,
):
    """A Lightning WandbLogger; offline (synced later with `wandb sync`) when there is no API key."""
    from lightning.pytorch.loggers import WandbLogger

    global _said_offline
    if offline is None:
        offline = os.environ.get("WANDB_MODE") in ("offline", "dryrun") or not wandb_api_key_available()
        if offline and not _said_offline:
            _said_offline = True
            log.warning("W&B: no API key found; logging offline to each run folder's wandb/ (upload: `wandb sync`)")
    return WandbLogger(
        project=project,
        name=name,
        save_dir=save_dir,
        entity=entity,
        group=group,
        tags=list(tags or []),
        offline=offline,
    )


def finish_loggers(loggers: list) -> None:
    """Close W&B runs, so the next job of a sweep in this process starts a new one."""
    from lightning.pytorch.loggers import WandbLogger

    for logger in loggers:
        if isinstance(logger, WandbLogger) and logger._experiment is not None:
            logger.experiment.finish()


def wandb_identity(loggers: list) -> dict | None:
    """The W&B run's id, name, group and project (None without a W&B logger), for the run's summary."""
    from lightning.pytorch.loggers import WandbLogger

    for logger in loggers:
        if isinstance(logger, WandbLogger):
            run = logger.experiment
            return {"id": run.id, "name": run.name, "group": run.group, "project": run.project}
    return None
