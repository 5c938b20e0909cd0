"""Rows from the user's files (JSONL/JSON/CSV/Parquet), folders of such files laid out as Hub data
set repositories are, or a Hugging Face `datasets` name.

Each row keeps the values its file gives it: JSON rows are read with the `json` module, so `5` stays
the integer 5 even when another row holds `0.5` (an Arrow reader would widen the whole column to
float and turn it into 5.0); CSV cells stay text; Parquet values come back as the Python values of
their column's type (Parquet columns are typed by whoever wrote the file: a float column written
as float reads as float). A key missing from a row stays missing (it is not filled with null).

A data set spec (`FileSource`, the keys of `data.source`) names the rows: `path` is a file, a folder or
a Hub id, optionally ending in `#N` (a sample of N rows, as ms-swift writes it); `subset` (alias `name`)
and `split` pick within a folder or Hub data set; `max_rows` is the same sample size as `#N`.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from alignlab.data.formats import check_mapped_columns
from alignlab.data.options import check_max_rows
from alignlab.data.rows import to_canonical
from alignlab.data.streaming import PEEK_ROWS, STREAM_KINDS, RowStream
from alignlab.errors import ConfigError, DataError

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
    return _json_document(path, path.read_text(encoding="utf-8"))


def _json_document(path: Path, text: str) -> list:
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


def _open(name: str, mode: str = "r"):
    """A local file, or a data file of a Hub data set (an `hf://` URL, as `datasets` resolves them)."""
    if Path(name).exists():
        return open(name, mode, encoding="utf-8") if "b" not in mode else open(name, mode)
    from datasets.utils.file_utils import xopen

    return xopen(name, mode, encoding="utf-8") if "b" not in mode else xopen(name, mode)


def _file_records(files: list[str]) -> Iterator[dict]:
    """{"file", "row" (1-based), "raw"} for every row of `files` (local paths or Hub URLs) in order, read
    lazily, each with the values written in it (see the module docstring)."""
    for name in files:
        path = Path(name)
        suffix = path.suffix.lower()
        if suffix == ".jsonl":
            with _open(name) as f:
                for row, raw in enumerate(_json_lines(path, f), 1):
                    yield {"file": name, "row": row, "raw": raw}
        elif suffix == ".parquet":
            import pyarrow.parquet as pq

            row = 0
            with _open(name, "rb") as f:
                for batch in pq.ParquetFile(f).iter_batches(batch_size=1024):
                    for raw in batch.to_pylist():
                        row += 1
                        yield {"file": name, "row": row, "raw": raw}
        elif suffix == ".csv":
            import pandas as pd

            row = 0
            with _open(name) as f:
                for chunk in pd.read_csv(f, dtype=str, keep_default_na=False, chunksize=1024):
                    for raw in chunk.to_dict("records"):
                        row += 1
                        yield {"file": name, "row": row, "raw": raw}
        else:  # a JSON document is one value: read whole
            if Path(name).exists():
                values = read_rows(name)
            else:
                with _open(name) as f:
                    values = _json_document(path, f.read())
            for row, raw in enumerate(values, 1):
                yield {"file": name, "row": row, "raw": raw}


def file_stream(files: list[Path] | list[str]):
    """A `datasets.IterableDataset` of {"file", "row", "raw"} records over local files (or a Hub data
    set's file URLs), one shard each."""
    import datasets

    return datasets.IterableDataset.from_generator(_file_records, gen_kwargs={"files": [str(f) for f in files]})


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


# Files a Hub data set repository may hold beside its rows (`datasets` metadata), never read as rows.
_METADATA_FILES = {"dataset_infos.json", "dataset_info.json", "dataset_dict.json", "state.json"}
_SAMPLE_SUFFIX = re.compile(r"^(?P<path>.+)#(?P<rows>\d+)$")


def split_sample_suffix(path: str) -> tuple[str, int | None]:
    """`"name#500"` → ("name", 500): a sample size written after the path (ms-swift's `dataset#N`).
    A local path that itself ends in `#digits` is kept whole."""
    match = _SAMPLE_SUFFIX.match(path)
    if match is None or Path(path).expanduser().exists():
        return path, None
    return match["path"], int(match["rows"])


def file_split(file: Path) -> str:
    """The split a data file of a Hub-shaped folder belongs to: its name up to the first `-` or `.`
    (`train_prefs-00000-of-00001.parquet` → train_prefs, `test.jsonl` → test). A name of digits only
    (`0000.parquet`, the layout of the Hub's Parquet conversion) takes its folder's name instead
    (`default/train/0000.parquet` → train)."""
    stem = re.split(r"[-.]", file.name, maxsplit=1)[0]
    return file.parent.name if stem.isdigit() else stem


def data_files(folder: Path) -> list[Path]:
    """Every data file under `folder` (any depth), sorted by path: the order shards are read in.
    Hidden folders (.git, .cache) and `datasets`' metadata files are not data."""
    return sorted(
        p
        for p in folder.rglob("*")
        if p.suffix.lower() in _FORMATS
        and p.name not in _METADATA_FILES
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
        and p.is_file()
    )


def folder_subsets(folder: Path) -> list[str]:
    """Subfolders of a Hub-shaped folder that hold data files (its subsets, when it has several)."""
    return sorted(d.name for d in folder.iterdir() if d.is_dir() and not d.name.startswith(".") and data_files(d))


def folder_splits(folder: Path, subset: str | None, key: str = "data.source") -> dict[str, list[Path]]:
    """Split name → its data files (sorted) in a folder laid out as a Hub data set repository:
    `data/train_prefs-00000-of-00001.parquet`, `<subset>/train-*.jsonl`, `<subset>/<split>/0000.parquet`
    or plain `train.jsonl` / `test.jsonl` (see `file_split`). With `subset`, only `<folder>/<subset>/`.

    Raises:
        DataError: no data files; no such subset (listing those present); the same split in several
            subfolders while no subset is chosen (they are subsets: `key`.subset must pick one).
    """
    root = folder
    if subset:
        root = folder / subset
        if not root.is_dir() or not data_files(root):
            raise DataError(
                str(folder),
                f"has no subset {subset!r} (a subfolder with data files); subsets present: {folder_subsets(folder)}; "
                f"check {key}.subset",
            )
    files = data_files(root)
    if not files:
        raise DataError(str(root), f"holds no data files ({', '.join(sorted(_FORMATS))}, at any depth)")
    splits: dict[str, list[Path]] = {}
    for file in files:
        splits.setdefault(file_split(file), []).append(file)
    if not subset:
        for name, members in splits.items():
            tops = sorted({f.relative_to(root).parts[0] for f in members if len(f.relative_to(root).parts) > 1})
            if len(tops) > 1 and set(tops) != {"data"}:
                raise DataError(
                    str(folder),
                    f"holds split {name!r} in several subfolders ({', '.join(tops)}): they are subsets of the data "
                    f"set; choose one with {key}.subset",
                )
    return splits


def hub_data_files(path: str, subset: str | None, split: str) -> list[str] | None:
    """The data files (URLs) of a Hub data set's split when `datasets` would read them as JSON, JSON Lines
    or CSV and the data set declares no column types: alignlab then reads them itself, so that each
    value keeps the type written in the file (`datasets` reads such files through Arrow, which widens a
    column holding 5 and 0.5 to floats, and through pandas, which reads "007" as 7). None otherwise
    (Parquet keeps the types its writer gave; declared types are the author's): `datasets` reads it."""
    import datasets

    try:
        builder = datasets.load_dataset_builder(path, name=subset)
        files = builder.config.data_files or {}
        if builder.name not in ("json", "csv") or builder.info.features is not None or split not in files:
            return None
        default, where = type(builder.config)(), ("name", "version", "data_dir", "data_files", "description")
        if any(getattr(builder.config, k, None) != v for k, v in vars(default).items() if k not in where):
            return None  # read with options of its own (a JSON field, a CSV separator): as `datasets` reads it
        names = [str(f) for f in files[split]]
        return names if names and all(Path(n).suffix.lower() in _FORMATS for n in names) else None  # not .gz
    except Exception:  # anything unusual: `datasets` reads it, and its errors say what is wrong
        return None


def read_hub(path: str, subset: str | None, split: str, key: str = "data.source", streaming: bool = False):
    """A Hub data set's split through `datasets.load_dataset` (a `Dataset`, or an `IterableDataset`
    when streaming).

    Raises:
        DataError: an unknown split or subset, with the names `datasets` lists, and the key to change;
            anything else `datasets` raises (network, parse errors), with its text.
    """
    import datasets

    try:
        return datasets.load_dataset(path, name=subset, split=split, streaming=streaming)
    except Exception as e:
        text = str(e).strip().rstrip(".")
        if isinstance(e, ValueError) and "Unknown split" in text:
            raise DataError(path, f"{text}; check {key}.split") from None
        if isinstance(e, ValueError) and ("BuilderConfig" in text or "Config name is missing" in text):
            raise DataError(path, f"{text}; check {key}.subset (datasets calls it the config name)") from None
        raise DataError(path, f"could not be read: {type(e).__name__}: {e}") from None


def draw_rows(n_rows: int, count: int, rng: random.Random) -> list[int]:
    """Positions of `count` rows drawn from `n_rows`: every row `count // n_rows` times (whole passes,
    in order), then `count % n_rows` rows drawn without replacement by `rng`, kept in their order. So a
    count up to the size is a sample without replacement, and a larger one repeats the rows evenly."""
    passes, rest = divmod(count, n_rows)
    return [i for _ in range(passes) for i in range(n_rows)] + sorted(rng.sample(range(n_rows), rest))


class FileSource:
    """A data set spec (the keys of `data.source`): train rows from `path` (a file, a Hub-shaped folder
    or a Hub id, see the module docstring), and held-out rows from `eval_path` / `eval_split`, or else
    a seeded `eval_fraction` of the train rows.

    `#N` on a path, or `max_rows`, keeps a seeded sample of N of its rows (`draw_rows`: without
    replacement, in file order; more than the rows repeats them), drawn by `split_seed` before the
    held-out fraction is cut. `columns` renames the user's columns to alignlab's before conversion
    (`{question: prompt}`).

    A row that cannot be used stops loading with an error naming file, row and field; with
    `on_bad_row="skip"` it is left out instead, and the count (with the first reason) is logged.

    A source of your own (the bundled tasks, alignlab.data.arith.ArithTask and
    alignlab.data.shapes.ShapesTask, are two; `data.source._target_` names it) defines
    `load(kind, on_bad_row="error")`: {"train": rows, "eval": rows} in the canonical form of `kind`
    (alignlab.data.rows; a train split may instead be a streamed alignlab.data.streaming.RowStream),
    raising DataError for a bad row. It may define `describe()` (how errors name it), `origin(row)`
    ((file, row number, field) of a row it made, for errors), a `skipped` {split: count} and the
    `columns` and `row_converter` keywords of `load` (without one, data.columns or data.row_converter is
    refused).

    Raises:
        ConfigError: (on construction) `subset` and `name` disagree; `#N` and `max_rows` disagree; a
            sample size below 1; `eval_split` on a single file.
    """

    def __init__(
        self,
        path: str | None,
        eval_path: str | None = None,
        eval_fraction: float = 0.05,
        split_seed: int = 0,
        subset: str | None = None,
        name: str | None = None,
        split: str = "train",
        eval_split: str | None = None,
        max_rows: int | None = None,
        columns: dict[str, str] | None = None,
        streaming: bool = False,
        shuffle_buffer: int = 1000,
        *,
        key: str = "data.source",
    ):
        self.key = key  # the config key errors name (a mixture's part: data.sources[i])
        self.eval_path, self.eval_fraction, self.split_seed = eval_path, eval_fraction, split_seed
        if subset is not None and name is not None and subset != name:
            raise ConfigError(f"{self.key}.subset={subset!r} and {self.key}.name={name!r} disagree; give one of them")
        self.subset, self.split, self.eval_split = subset if subset is not None else name, split, eval_split
        self.path, sample = split_sample_suffix(path) if path else (path, None)
        if sample is not None and max_rows is not None and sample != max_rows:
            raise ConfigError(f"{self.key}.path ends in #{sample} but {self.key}.max_rows={max_rows}; give one of them")
        self.max_rows = sample if sample is not None else max_rows
        check_max_rows(self.max_rows, self.key)
        self.columns = dict(columns or {})
        self._columns = self.columns  # in force while loading: data.columns under this spec's own map
        self._converter = None  # in force while loading: data.row_converter (a registry Entry), or None
        self._columns_key = f"{self.key}.columns"  # the key errors about the map name
        self.settings = {  # as given, for `with_spec`
            "path": path,
            "eval_path": eval_path,
            "eval_fraction": eval_fraction,
            "split_seed": split_seed,
            "subset": self.subset,
            "split": split,
            "eval_split": eval_split,
            "max_rows": max_rows,
            "columns": columns,
            "streaming": streaming,
            "shuffle_buffer": shuffle_buffer,
        }
        self.streaming, self.shuffle_buffer = streaming, shuffle_buffer
        self.skipped: dict[str, int] = {}  # split → rows left out under on_bad_row="skip"
        self._origin: dict[int, tuple[str, int, str]] = {}  # id(canonical row) → (file, row, prompt field)

    def with_spec(self, spec: dict, key: str) -> FileSource:
        """A source of this one's settings with `spec`'s keys in their place (a mixture's part, whose
        errors name `key`, e.g. data.sources[1]). A spec's `name` stands for `subset`."""
        settings = {**self.settings, **spec}
        if "name" in spec:
            settings["subset"] = settings.pop("name")
        return FileSource(**settings, key=key)

    # -- reading -----------------------------------------------------------------------------------
    def _raw(
        self, location: str, split: str, key: str, split_key: str, sample: int | None
    ) -> list[tuple[str, int, dict, Path | None]]:
        """(file, 1-based row in it, raw row, folder for relative images) of every row `location`
        gives for `split`, sampled to `sample` rows when given; `key` / `split_key`: the config keys
        that gave the location and the split, for errors."""
        location, suffix = split_sample_suffix(location)
        sample = suffix if suffix is not None else sample
        check_source_exists(location, key)
        local = Path(location).expanduser()
        if local.is_dir():
            files = self._split_files(local, split, split_key)
            rows = [(str(f), i + 1, raw, f.parent) for f in files for i, raw in enumerate(read_rows(str(f)))]
        elif local.exists():
            rows = [(location, i + 1, raw, local.parent) for i, raw in enumerate(read_rows(location))]
        else:
            where = location + (f" ({self.subset})" if self.subset else "") + f" [{split}]"
            files = hub_data_files(location, self.subset, split)
            if files is not None:  # read here, so that each value keeps its written type
                rows = [(r["file"], r["row"], r["raw"], None) for r in _file_records(files)]
            else:
                dataset = read_hub(location, self.subset, split, self.key)
                rows = [(where, i + 1, raw, None) for i, raw in enumerate(dataset.to_list())]
        if not rows:
            empty = "has no rows" if local.is_file() else f"split {split!r} has no rows"
            raise DataError(location, f"{empty}; check {key if local.is_file() else split_key}")
        if sample is not None:
            rng = random.Random(f"{self.split_seed}:sample")  # a text seed hashes the same in every process
            if sample > len(rows):
                log.info("%s: %d rows drawn from %d (each row at least once)", location, sample, len(rows))
            rows = [rows[i] for i in draw_rows(len(rows), sample, rng)]
        return rows

    def _split_files(self, folder: Path, split: str, split_key: str) -> list[Path]:
        """The data files of `split` in a Hub-shaped folder (`folder_splits`).

        Raises:
            DataError: no such split, listing those present and naming `split_key`.
        """
        splits = folder_splits(folder, self.subset, self.key)
        if split not in splits:
            raise DataError(
                str(folder), f"has no split {split!r}; splits present: {sorted(splits)}; set {split_key} to one of them"
            )
        return splits[split]

    def _canonical(self, location: str, split_name: str, split_key: str, kind: str, on_bad_row: str, split: str):
        key = f"{self.key}.eval_path" if split == "eval" and self.eval_path else f"{self.key}.path"
        rows = self._raw(location, split_name, key, split_key, self.max_rows if split == "train" else None)
        if self._converter is None:  # with a converter, the map names the columns it returns
            check_mapped_columns((raw for _, _, raw, _ in rows), self._columns, location, self._columns_key)
        out, bad = [], []
        for file, index, raw, folder in rows:
            try:
                out.append(to_canonical(raw, kind, file, index, folder, self._columns, self._converter))
                self._origin[id(out[-1])] = (file, index, _prompt_field(raw))
            except DataError as e:
                if on_bad_row != "skip":
                    raise
                bad.append(e)
        if bad:
            self.skipped[split] = len(bad)
            log.warning(
                "%s: skipped %d of %d rows (data.on_bad_row=skip); first: %s", location, len(bad), len(rows), bad[0]
            )
        if not out:
            raise DataError(location, f"every one of its {len(rows)} rows is bad; the first: {bad[0]}")
        return out

    def load(
        self, kind: str, on_bad_row: str = "error", columns: dict | None = None, row_converter=None
    ) -> dict[str, list[dict]]:
        """Canonical rows of `kind`: {"train": [...], "eval": [...]}. `row_converter` (data.row_converter,
        a resolved registry entry) converts each row first; `columns` (data.columns, for every source) then
        renames columns; this spec's own `columns` take precedence over it.

        Raises:
            DataError: a missing file or folder, an unknown split or subset, a bad row (file, row, field).
        """
        if self.path is None:
            raise ConfigError(f"{self.key}.path is not set; give a file, a folder or a Hub data set id")
        self._columns = {**(columns or {}), **self.columns}
        self._converter = row_converter
        self._columns_key = f"{self.key}.columns" if self.columns else "data.columns"
        if self.eval_split and not self.eval_path and Path(self.path).expanduser().is_file():
            raise ConfigError(
                f"{self.key}.eval_split={self.eval_split!r} needs a folder or a Hub data set, but {self.key}.path is "
                f"one file ({self.path}), which has no splits; give the held-out file as {self.key}.eval_path"
            )
        if self.streaming:
            if kind not in STREAM_KINDS:
                raise ConfigError(
                    f"{self.key}.streaming=true reads {', '.join(STREAM_KINDS)} data, not {kind} data (KTO pairs "
                    f"every row with a partner drawn over the whole set); set {self.key}.streaming=false"
                )
            train = self._stream(kind, on_bad_row)
        else:
            train = self._canonical(self.path, self.split, f"{self.key}.split", kind, on_bad_row, "train")
        if self.eval_path or self.eval_split:
            held, split = self.eval_path or self.path, self.eval_split or self.split
            split_key = f"{self.key}.eval_split" if self.eval_split else f"{self.key}.split"
            return {"train": train, "eval": self._canonical(held, split, split_key, kind, on_bad_row, "eval")}
        if self.streaming:  # a stream's length is unknown until read: no fraction of it is held out
            return {"train": train, "eval": []}
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

    def _stream(self, kind: str, on_bad_row: str):
        """The train split as a RowStream (alignlab.data.streaming), its first rows read and checked now.

        Raises:
            DataError: as `load`, for the location and the first `PEEK_ROWS` rows.
        """
        check_source_exists(self.path, f"{self.key}.path")
        local = Path(self.path).expanduser()
        dataset, where = self._stream_dataset(local)
        if self.max_rows is not None:
            dataset = dataset.take(self.max_rows)  # a stream's first N rows: a sample would need all of them
        first_bad: list[DataError] = []  # the first bad row's error (data.on_bad_row=skip)
        convert = self._stream_converter(kind, on_bad_row, where, first_bad)
        peeked = list(dataset.take(PEEK_ROWS))
        if not peeked:
            empty = "has no rows" if local.is_file() else f"split {self.split!r} has no rows"
            raise DataError(self.path, f"{empty}; check {self.key}.{'path' if local.is_file() else 'split'}")
        raws = [record["raw"] if where is None else record for record in peeked]
        if self._converter is None:  # a map naming no column fails (with a converter: the columns it returns)
            check_mapped_columns(raws, self._columns, self.path, self._columns_key)
        checked = [convert(record, position) for position, record in enumerate(peeked)]
        if len(peeked) < PEEK_ROWS and all(row is None for row in checked):  # read whole: every row is bad
            raise DataError(self.path, f"every one of its {len(peeked)} rows is bad; the first: {first_bad[0]}")
        self._forget([row for row in checked if row is not None])
        self.skipped.pop("train", None)  # counted again as training meets them
        stream = RowStream(dataset, self.path, self.shuffle_buffer, convert, self._forget)
        stream.head, stream.whole = [row for row in checked if row is not None], len(peeked) < PEEK_ROWS
        return stream

    def _stream_dataset(self, local: Path) -> tuple[Any, str | None]:
        """(the train split as a `datasets.IterableDataset`, where): local files, or a Hub data set's files
        that alignlab reads itself (`hub_data_files`), as `file_stream`'s {"file", "row", "raw"} records
        (where None); else `datasets`' stream of raw rows, `where` naming it for errors ("id (subset) [split]").

        Raises:
            DataError: a local file of an unknown type.
        """
        if local.is_dir():
            return file_stream(self._split_files(local, self.split, f"{self.key}.split")), None
        if local.exists():
            if local.suffix.lower() not in _FORMATS:
                raise DataError(str(local), f"unknown file type; expected one of {sorted(_FORMATS)}")
            return file_stream([local]), None
        files = hub_data_files(self.path, self.subset, self.split)
        if files is not None:  # read here, so that each value keeps its written type
            return file_stream(files), None
        dataset = read_hub(self.path, self.subset, self.split, self.key, streaming=True)
        return dataset, self.path + (f" ({self.subset})" if self.subset else "") + f" [{self.split}]"

    def _stream_converter(self, kind: str, on_bad_row: str, where: str | None, first_bad: list[DataError]):
        """`convert(record, position)`: a streamed record (see `_stream_dataset`) as a canonical row, its
        origin kept; None for a bad row under on_bad_row=skip (counted, the first logged and kept in
        `first_bad`). Raises DataError for a bad row otherwise."""

        def convert(record: dict, position: int) -> dict | None:
            if where is None:  # a local file's record: its file and row
                file, index, raw = record["file"], record["row"], record["raw"]
            else:
                file, index, raw = f"{where}, streamed row {position + 1}", None, record
            try:
                folder = Path(file).parent if where is None and Path(file).exists() else None
                row = to_canonical(raw, kind, file, index, folder, self._columns, self._converter)
            except DataError as e:
                if on_bad_row != "skip":
                    raise
                first_bad[:] = first_bad or [e]
                self.skipped["train"] = self.skipped.get("train", 0) + 1
                if self.skipped["train"] == 1:
                    log.warning("%s: left out a bad row (data.on_bad_row=skip): %s", self.path, e)
                return None
            self._origin[id(row)] = (file, index, _prompt_field(raw))
            return row

        return convert

    def _forget(self, rows: list[dict]) -> None:
        for row in rows:
            self._origin.pop(id(row), None)

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
