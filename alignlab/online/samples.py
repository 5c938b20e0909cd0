"""Tables of sampled answers: appended to <run>/samples.jsonl and, under W&B, logged as a table.

A row is `step`, `prompt` (the prompt's messages, a list of {role, content}, as the data gave them),
`answer` (the generated text), `score` (the algorithm's score of the answer: PPO's reward-model score,
GRPO's weighted reward; `score` as alignlab.score writes it), multi-turn GRPO's `conversation` (the episode
after the prompt), then the data row's extra columns.
"""

from __future__ import annotations

import json
from pathlib import Path


def sample_row(prompt: list[dict], answer: str, score: float) -> dict:
    """One sample-table row: the prompt's messages, the answer text and its score."""
    return {"prompt": prompt, "answer": answer, "score": score}


def with_columns(rows: list[dict], columns: dict[str, list]) -> list[dict]:
    """Each row followed by its data row's extra columns (e.g. `solution`), values as the file wrote
    them; a column named like one of the row's own keys (prompt, answer, score) is left out."""
    return [
        {**row, **{k: v[i] for k, v in columns.items() if k not in row and k != "step"}} for i, row in enumerate(rows)
    ]


def log_samples(trainer, rows: list[dict], key: str = "samples") -> None:
    """Write `rows` (dicts with the same keys: prompt/answer/score and the data's extra columns) for the
    current step."""
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
