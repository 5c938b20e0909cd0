"""Rows from the user's files (JSONL/JSON/CSV/Parquet) or a Hugging Face `datasets` name."""

from __future__ import annotations

import random
from pathlib import Path

from alignlab.data.rows import to_canonical
from alignlab.errors import DataError

_FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


def read_rows(path: str, split: str = "train") -> list[dict]:
    """Raw rows of a local file, or of a data set on the Hub when `path` is not a local file."""
    import datasets

    datasets.disable_progress_bars()
    local = Path(path).expanduser()
    try:
        if local.exists():
            fmt = _FORMATS.get(local.suffix.lower())
            if fmt is None:
                raise DataError(str(local), f"unknown file type; expected one of {sorted(_FORMATS)}")
            if fmt == "csv":  # cells are text: keep "7" a string and an empty cell empty, not a number or NaN
                import pandas as pd

                return pd.read_csv(local, dtype=str, keep_default_na=False).to_dict("records")
            ds = datasets.load_dataset(fmt, data_files=str(local), split="train")
        else:
            ds = datasets.load_dataset(path, split=split)
    except DataError:
        raise
    except FileNotFoundError as e:
        raise DataError(path, f"not found ({e})") from None
    except Exception as e:  # arrow/json/csv parse errors: keep their text, name the file
        raise DataError(path, f"could not be read: {type(e).__name__}: {e}") from None
    return ds.to_list()


class FileSource:
    """A train file and either a held-out file or a seeded held-out fraction of the train file."""

    def __init__(self, path: str, eval_path: str | None = None, eval_fraction: float = 0.05, split_seed: int = 0):
        self.path, self.eval_path, self.eval_fraction, self.split_seed = path, eval_path, eval_fraction, split_seed

    def _canonical(self, path: str, kind: str) -> list[dict]:
        rows = read_rows(path)
        if not rows:
            raise DataError(path, "has no rows")
        return [to_canonical(r, kind, path, i + 1) for i, r in enumerate(rows)]

    def load(self, kind: str) -> dict[str, list[dict]]:
        train = self._canonical(self.path, kind)
        if self.eval_path:
            return {"train": train, "eval": self._canonical(self.eval_path, kind)}
        order = list(range(len(train)))
        random.Random(self.split_seed).shuffle(order)
        n_eval = int(round(len(train) * self.eval_fraction))
        if self.eval_fraction > 0 and len(train) > 1:
            n_eval = max(1, min(n_eval, len(train) - 1))
        held = set(order[:n_eval])
        return {
            "train": [r for i, r in enumerate(train) if i not in held],
            "eval": [r for i, r in enumerate(train) if i in held],
        }

    def describe(self) -> str:
        return self.path
