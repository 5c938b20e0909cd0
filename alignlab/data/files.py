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
    check_source_exists(path)
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


def looks_like_file(path: str) -> bool:
    """A name that can only mean a local file, never a Hub data set id: it carries a data file
    extension or starts like a path (/, ./, ../, ~)."""
    return Path(path).suffix.lower() in _FORMATS or path.startswith(("/", "./", "../", "~", ".\\"))


def check_source_exists(path: str, key: str | None = None) -> None:
    """Raise DataError at once for a local file that is not there, naming the config `key` that gave
    it, instead of looking the name up on the Hub; and for a Hub name while the Hub is unreachable."""
    if Path(path).expanduser().exists():
        return
    where = f"check {key} (relative paths start from {Path.cwd()})" if key else f"relative to {Path.cwd()}"
    if looks_like_file(path):
        raise DataError(path, f"no such file; {where}")
    from alignlab.models.loading import hub_reachable

    if not hub_reachable():
        raise DataError(
            path,
            f"no such local file, and it cannot be looked up as a Hugging Face Hub data set because the Hub "
            f"is not reachable (offline); {where}, or download the data set where there is network",
        )


class FileSource:
    """A train file and either a held-out file or a seeded held-out fraction of the train file.

    A row that cannot be used stops loading with an error naming file, row and field; with
    `on_bad_row="skip"` it is left out instead, and the count (with the first reason) is logged.
    """

    def __init__(self, path: str, eval_path: str | None = None, eval_fraction: float = 0.05, split_seed: int = 0):
        self.path, self.eval_path, self.eval_fraction, self.split_seed = path, eval_path, eval_fraction, split_seed
        self.skipped: dict[str, int] = {}  # split → rows left out under on_bad_row="skip"

    def _canonical(self, path: str, kind: str, on_bad_row: str, split: str) -> list[dict]:
        check_source_exists(path, "data.source.eval_path" if split == "eval" and self.eval_path else "data.source.path")
        rows = read_rows(path)
        if not rows:
            raise DataError(path, "has no rows")
        out, bad = [], []
        for i, raw in enumerate(rows):
            try:
                out.append(to_canonical(raw, kind, path, i + 1))
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
