"""Rows from the user's files (JSONL/JSON/CSV/Parquet) or a Hugging Face `datasets` name."""

from __future__ import annotations

import logging
import random
from pathlib import Path

from alignlab.data.rows import to_canonical
from alignlab.errors import DataError

log = logging.getLogger(__name__)

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
    """A train file and either a held-out file or a seeded held-out fraction of the train file.

    A row that cannot be used stops loading with an error naming file, row and field; with
    `on_bad_row="skip"` it is left out instead, and the count (with the first reason) is logged.
    """

    def __init__(self, path: str, eval_path: str | None = None, eval_fraction: float = 0.05, split_seed: int = 0):
        self.path, self.eval_path, self.eval_fraction, self.split_seed = path, eval_path, eval_fraction, split_seed
        self.skipped: dict[str, int] = {}  # split → rows left out under on_bad_row="skip"
        self._origin: dict[int, tuple[str, int, str]] = {}  # id(canonical row) → (file, row, prompt field)

    def _canonical(self, path: str, kind: str, on_bad_row: str, split: str) -> list[dict]:
        rows = read_rows(path)
        if not rows:
            raise DataError(path, "has no rows")
        out, bad = [], []
        for i, raw in enumerate(rows):
            try:
                out.append(to_canonical(raw, kind, path, i + 1))
                self._origin[id(out[-1])] = (path, i + 1, _prompt_field(raw))
            except DataError as e:
                if on_bad_row != "skip":
                    raise
                bad.append(e)
        if bad:
            self.skipped[split] = len(bad)
            log.warning(
                "%s: skipped %d of %d rows (data.on_bad_row=skip); first: %s", path, len(bad), len(rows), bad[0]
            )
        if not out:
            raise DataError(path, f"every one of its {len(rows)} rows is bad; the first: {bad[0]}")
        return out

    def load(self, kind: str, on_bad_row: str = "error") -> dict[str, list[dict]]:
        train = self._canonical(self.path, kind, on_bad_row, "train")
        if self.eval_path:
            return {"train": train, "eval": self._canonical(self.eval_path, kind, on_bad_row, "eval")}
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

    def origin(self, row: dict) -> tuple[str, int, str] | None:
        """(file, row number, field that holds the prompt) of a canonical row this source made."""
        return self._origin.get(id(row))


def _prompt_field(raw: dict) -> str:
    """The field a row's prompt messages come from (what an error about the conversation names)."""
    fields = ("messages", "prompt", "chosen", "completion")
    return next((f for f in fields if raw.get(f) is not None), "prompt")
