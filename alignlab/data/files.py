"""Rows from the user's files (JSONL/JSON/CSV/Parquet) or a Hugging Face `datasets` name.

Each row keeps the values its file gives it: JSON rows are read with the `json` module, so `5` stays
the integer 5 even when another row holds `0.5` (an Arrow reader would widen the whole column to
float and turn it into 5.0); CSV cells stay text; Parquet values come back as the Python values of
their column's type (Parquet columns are typed by whoever wrote the file: a float column written
as float reads as float). A key missing from a row stays missing (it is not filled with null).
"""

from __future__ import annotations

import json
import logging
import os
import random
from collections.abc import Iterator, Sequence
from pathlib import Path

from alignlab.data.formats import check_mapped_columns
from alignlab.data.rows import to_canonical
from alignlab.errors import DataError

log = logging.getLogger(__name__)

_FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
_CONTAINER_KEYS = ("data", "rows")  # a JSON file may hold {"data": [rows]} or {"rows": [rows]}


def _json_lines(path: Path, lines: Iterator[str], first_line: int = 1) -> Iterator[dict]:
    """One value per non-blank line; a line that is not JSON is named by its number."""
    for number, line in enumerate(lines, first_line):
        if not line.strip():
            continue
        try:
            yield json.loads(line.rstrip("\r\n"))
        except json.JSONDecodeError as e:
            raise DataError(str(path), f"line {number} is not valid JSON ({e.msg} at column {e.pos + 1})") from None


def read_jsonl(path: Path) -> list:
    """Rows of a JSON Lines file, streamed line by line, each with the types written in the file."""
    with open(path, encoding="utf-8") as f:
        return list(_json_lines(path, f))


def read_json(path: Path) -> list:
    """Rows of a JSON file: a list of rows, `{"data": [rows]}` / `{"rows": [rows]}`, a single row
    (an object), or JSON Lines saved under a .json name. Each row keeps the types written in the file."""
    text = path.read_text(encoding="utf-8")
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg != "Extra data":  # "Extra data": one JSON value per line, read as JSON Lines
            raise DataError(str(path), f"is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
        return list(_json_lines(path, text.splitlines()))
    if isinstance(value, dict) and len(value) == 1:
        ((key, inner),) = value.items()
        if key in _CONTAINER_KEYS and isinstance(inner, list):
            return inner
    return value if isinstance(value, list) else [value]


def read_parquet(path: Path) -> list[dict]:
    """Rows of a Parquet file as Python values of each column's type (as the writer typed it)."""
    import pyarrow.parquet as pq

    return pq.read_table(path).to_pylist()


_READERS = {".jsonl": read_jsonl, ".json": read_json, ".parquet": read_parquet}


def read_rows(path: str, split: str = "train") -> list[dict]:
    """Raw rows of a local file, each with the values written in it (see the module docstring), or of
    a data set on the Hub when `path` is not a local file (as `datasets` gives them).

    Raises:
        DataError: the file is of an unknown type, cannot be read, or holds text that is not JSON
            (naming the line).
    """
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
            return _READERS[local.suffix.lower()](local)
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


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hub's host answers at all; saves a minute of retries on a machine without network."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def check_source_exists(path: str, key: str | None = None) -> None:
    """Raise DataError at once for a local file that is not there, naming the config `key` that gave
    it, instead of looking the name up on the Hub; and for a Hub name while the Hub is unreachable."""
    if Path(path).expanduser().exists():
        return
    where = f"check {key} (relative paths start from {Path.cwd()})" if key else f"relative to {Path.cwd()}"
    if looks_like_file(path):
        raise DataError(path, f"no such file; {where}")
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
        self._origin: dict[int, tuple[str, int, str]] = {}  # id(canonical row) → (file, row, prompt field)

    def _canonical(self, path: str, kind: str, on_bad_row: str, split: str, columns: dict | None = None) -> list[dict]:
        check_source_exists(path, "data.source.eval_path" if split == "eval" and self.eval_path else "data.source.path")
        rows = read_rows(path)
        if not rows:
            raise DataError(path, "has no rows")
        check_mapped_columns(rows, columns, path)
        out, bad = [], []
        local = Path(path).expanduser()
        folder = local.parent if local.exists() else None  # relative image paths are tried here first
        for i, raw in enumerate(rows):
            try:
                out.append(to_canonical(raw, kind, path, i + 1, base_dir=folder, columns=columns))
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

    def load(self, kind: str, on_bad_row: str = "error", columns: dict | None = None) -> dict[str, list[dict]]:
        """Canonical rows of both splits; `columns` (data.columns) renames the files' columns first."""
        train = self._canonical(self.path, kind, on_bad_row, "train", columns)
        if self.eval_path:
            return {"train": train, "eval": self._canonical(self.eval_path, kind, on_bad_row, "eval", columns)}
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
    fields = ("messages", "prompt", "chosen", "completion", "conversations", "instruction")
    return next((f for f in fields if raw.get(f) is not None), "prompt")


def write_jsonl(path: str | os.PathLike, rows: Sequence[dict]) -> None:
    """Write `rows` as JSON Lines: whole, then renamed into place, so never half a file."""
    out = Path(path)
    tmp = out.with_name(out.name + ".partial")
    with open(tmp, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    os.replace(tmp, out)
