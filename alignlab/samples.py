"""Tables of sampled answers: appended to <run>/samples.jsonl and, under W&B, logged as a table."""

from __future__ import annotations

import json
from pathlib import Path


def log_samples(trainer, rows: list[dict], key: str = "samples") -> None:
    """Write `rows` (dicts with the same keys, e.g. prompt/answer/score) for the current step."""
    if not rows or not trainer.is_global_zero:
        return
    step = trainer.global_step
    path = Path(trainer.default_root_dir) / f"{key}.jsonl"
    with open(path, "a") as f:
        for row in rows:
            f.write(json.dumps({"step": step, **row}) + "\n")
    from lightning.pytorch.loggers import WandbLogger

    columns = list(rows[0])
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            logger.log_table(key=key, columns=columns, data=[[r[c] for c in columns] for r in rows], step=step)
