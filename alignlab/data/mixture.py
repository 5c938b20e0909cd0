"""Mixtures of data sets: `data.sources`, a list of data set specs with weights.

Each spec takes the keys of `data.source` (`path`, `subset`/`name`, `split`, `eval_split`, `eval_path`,
`eval_fraction`, `max_rows`, `split_seed`, and `columns`, its own column map) plus `weight`; a key a
spec leaves out comes from `data.source`. Every source is read and split into train and held-out rows
on its own (its `#N`/`max_rows` sample first), then (`mixture_counts`):

- the mix has as many train rows as its sources together, N = Σ nᵢ;
- source i gets cᵢ = wᵢ / Σw × N of them, rounded by largest remainder so that the cᵢ add up to N;
- its cᵢ rows are drawn by `draw_rows`: without replacement while cᵢ ≤ nᵢ (a seeded sample, in file
  order), and beyond that every row ⌊cᵢ / nᵢ⌋ times plus a sample without replacement of the rest.

The draws use one generator seeded by `data.source.split_seed`, so a mix is the same in every run and
every process. The mix lists the sources in the order of `data.sources` (what `data.shuffle=false`
trains in); the held-out rows are every source's held-out rows, unweighted.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Mapping, Sequence
from typing import Any

from alignlab.data.files import FileSource, draw_rows
from alignlab.errors import ConfigError, DataError

log = logging.getLogger(__name__)

# The keys one spec of data.sources may hold.
SPEC_KEYS = (
    "path",
    "subset",
    "name",
    "split",
    "eval_split",
    "eval_path",
    "eval_fraction",
    "max_rows",
    "split_seed",
    "columns",
    "weight",
)


def check_sources(sources: Any) -> list[dict]:
    """The specs of `data.sources` as plain dicts, each checked.

    Raises:
        ConfigError: not a non-empty list of mappings; a spec without `path` or with a key it does not
            take; a weight that is not a finite number > 0; a `columns` that is not a mapping of names.
            Each names its key, e.g. `data.sources[1].weight`.
    """
    from omegaconf import DictConfig, ListConfig, OmegaConf

    if isinstance(sources, (DictConfig, ListConfig)):
        sources = OmegaConf.to_container(sources, resolve=True)
    if not isinstance(sources, Sequence) or isinstance(sources, str) or not sources:
        raise ConfigError(
            f"data.sources must be a non-empty list of data set specs ({{path: …, weight: …}}), got {sources!r}; "
            "null reads data.source alone"
        )
    specs = []
    for i, spec in enumerate(sources):
        key = f"data.sources[{i}]"
        if isinstance(spec, str):
            spec = {"path": spec}  # a bare path: weight 1
        if not isinstance(spec, Mapping):
            raise ConfigError(f"{key} must be a data set spec ({{path: …, weight: …}}), got {spec!r}")
        unknown = sorted(set(spec) - set(SPEC_KEYS))
        if unknown:
            raise ConfigError(f"{key} has key(s) {unknown} it does not take; a spec takes {list(SPEC_KEYS)}")
        if not spec.get("path"):
            raise ConfigError(f"{key}.path is not set; give a file, a folder or a Hub data set id")
        weight = spec.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight <= 0:
            raise ConfigError(
                f"{key}.weight must be a finite number > 0 (its share of the mix is weight / the weights' sum), "
                f"got {weight!r}; leave a source out rather than weigh it 0"
            )
        columns = spec.get("columns")
        if columns is not None and not (
            isinstance(columns, Mapping) and all(isinstance(k, str) and isinstance(v, str) for k, v in columns.items())
        ):
            raise ConfigError(f"{key}.columns must map column names to names ({{question: prompt}}), got {columns!r}")
        specs.append(dict(spec))
    return specs


def mixture_counts(sizes: Sequence[int], weights: Sequence[float]) -> list[int]:
    """Train rows each source gives the mix: cᵢ = wᵢ / Σw × Σn, rounded down, then the rows left over
    (Σn − Σ⌊·⌋) go one each to the largest remainders (ties: the earlier source). So Σcᵢ = Σnᵢ."""
    total, weight_sum = sum(sizes), float(sum(weights))
    quotas = [w / weight_sum * total for w in weights]
    counts = [math.floor(q) for q in quotas]
    by_remainder = sorted(range(len(quotas)), key=lambda i: (-(quotas[i] - counts[i]), i))
    for i in by_remainder[: total - sum(counts)]:
        counts[i] += 1
    return counts


class MixtureSource:
    """The rows of several data set specs mixed by weight (see the module docstring)."""

    def __init__(self, sources: Sequence[FileSource], weights: Sequence[float], seed: int = 0):
        if len(sources) != len(weights):
            raise ValueError(f"{len(sources)} sources for {len(weights)} weights")
        self.sources, self.weights, self.seed = list(sources), list(weights), seed
        self.counts: list[int] = []  # train rows each source gave the last load
        self._copies: dict[int, dict] = {}  # id(a repeated row's copy) → the row it copies

    @classmethod
    def from_specs(cls, specs: Any, base: Any) -> MixtureSource:
        """A mixture of `specs` (`data.sources`, checked by `check_sources`), each spec's missing keys
        taken from `base` (the `data.source` FileSource).

        Raises:
            ConfigError: a bad spec (see `check_sources`); `base` is not a file source (a bundled task).
        """
        specs = check_sources(specs)
        if not isinstance(base, FileSource):
            raise ConfigError(
                "data.sources mixes files, folders and Hub data sets; use it with a file data config "
                "(data=custom_pairs, custom_sft, custom_kto or custom_prompts)"
            )
        sources = []
        for i, spec in enumerate(specs):
            settings = {k: v for k, v in spec.items() if k != "weight"}
            sources.append(base.with_spec(settings, key=f"data.sources[{i}]"))
        return cls(sources, [float(s.get("weight", 1.0)) for s in specs], seed=base.split_seed)

    def load(
        self, kind: str, on_bad_row: str = "error", columns: dict | None = None, row_converter=None
    ) -> dict[str, list[dict]]:
        """The mix's train rows and every source's held-out rows; `columns` (data.columns) apply to every
        source, under each spec's own `columns`, and `row_converter` (data.row_converter) to every source.

        Raises:
            DataError: a source's own errors; a source with no train rows, or one whose weight gives it
                no row of the mix.
        """
        parts = [source.load(kind, on_bad_row, columns, row_converter) for source in self.sources]
        sizes = [len(part["train"]) for part in parts]
        for source, size in zip(self.sources, sizes):
            if not size:
                raise DataError(
                    source.describe(), f"has no train rows left after its held-out rows; check {source.key}"
                )
        self.counts = mixture_counts(sizes, self.weights)
        rng = random.Random(f"{self.seed}:mix")  # a text seed hashes the same in every process
        train = []
        for source, part, count, weight in zip(self.sources, parts, self.counts, self.weights):
            if count == 0:
                raise DataError(
                    source.describe(),
                    f"gets no row of the {sum(sizes)}-row mix at {source.key}.weight={weight:g}; raise its weight",
                )
            taken = set()
            for i in draw_rows(len(part["train"]), count, rng):
                row = part["train"][i]
                if i in taken:  # a repeat is its own row object: rows are told apart by identity downstream
                    copy = dict(row)
                    self._copies[id(copy)] = row
                    row = copy
                taken.add(i)
                train.append(row)
        log.info(
            "data.sources: %s",
            "; ".join(
                f"{s.describe()}: {c} of {len(train)} train rows ({c / n:.2f}× its {n})"
                for s, c, n in zip(self.sources, self.counts, sizes)
            ),
        )
        return {"train": train, "eval": [row for part in parts for row in part["eval"]]}

    @property
    def skipped(self) -> dict[str, int]:
        """Rows every source left out as bad (data.on_bad_row=skip), added up by split."""
        out: dict[str, int] = {}
        for source in self.sources:
            for split, n in source.skipped.items():
                out[split] = out.get(split, 0) + n
        return out

    def describe(self) -> str:
        return " + ".join(source.describe() for source in self.sources)

    def origin(self, row: dict) -> tuple[str, int, str] | None:
        """(file, row number, prompt field) of a mixed row, through the source that made it."""
        row = self._copies.get(id(row), row)
        return next((o for o in (s.origin(row) for s in self.sources) if o is not None), None)


def build_datamodule(data: Any):
    """The DataModule `data` (the `data` config group) describes. With `data.sources` set, `data.source`
    need not name a path: its other keys are every spec's defaults.

    Raises:
        ConfigError: a bad `data.sources` (see `check_sources`).
    """
    from hydra.utils import instantiate

    if data.get("sources"):
        check_sources(data.sources)
        return instantiate(data, source={"path": None})
    return instantiate(data)
