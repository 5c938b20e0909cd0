"""Logger factories. W&B goes offline by itself when no API key is available."""

from __future__ import annotations

import logging
import netrc
import os
import sys

from alignlab.runner.redact import redact_text

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
    extra = {}
    if any(redact_text(arg) != arg for arg in sys.argv[1:]):
        # W&B records the command line with the run's metadata; keep a secret given there out of it.
        import wandb

        extra["settings"] = wandb.Settings(x_disable_meta=True)
    logger = WandbLogger(
        project=project,
        name=name,
        save_dir=save_dir,
        entity=entity,
        group=group,
        tags=list(tags or []),
        offline=offline,
        **extra,
    )
    # Lightning always passes wandb.init(anonymous=None), which wandb warns about as deprecated (and ignores).
    logger._wandb_init.pop("anonymous", None)
    return logger


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


def csv_logger(save_dir: str, flush_logs_every_n_steps: int):
    """<run>/metrics.csv, appended to when a run resumes in its folder (Lightning's own writer deletes
    an existing file on start; the rows an interrupted run wrote are part of its history). Written to
    disk every `flush_logs_every_n_steps` steps (conf: trainer.log_every_n_steps, the cadence of the
    console's progress lines) and at the end."""
    import csv

    from lightning.pytorch.loggers import CSVLogger
    from lightning.pytorch.loggers.csv_logs import ExperimentWriter

    class KeepingWriter(ExperimentWriter):
        def _check_log_dir_exists(self) -> None:
            if self._fs.isfile(self.metrics_file_path):  # continue its columns; new ones widen the header
                with self._fs.open(self.metrics_file_path, "r", newline="") as f:
                    self.metrics_keys = list(csv.DictReader(f).fieldnames or [])

    class KeepingCSVLogger(CSVLogger):
        @property
        def experiment(self) -> ExperimentWriter:
            if self._experiment is None:
                self._fs.makedirs(self.root_dir, exist_ok=True)
                self._experiment = KeepingWriter(log_dir=self.log_dir)
            return self._experiment

    return KeepingCSVLogger(save_dir=save_dir, name="", version="", flush_logs_every_n_steps=flush_logs_every_n_steps)
