"""Streaming: training rows read as they are needed, for data sets that do not fit in memory.

With `data.source.streaming=true` the train split is a `datasets.IterableDataset` (a Hub data set in
`datasets`' streaming mode; local files read lazily, line by line or Parquet batch by batch, each file
a shard), shuffled by `datasets` with a buffer of `data.source.shuffle_buffer` rows (its shards'
order shuffled too) and a new order each epoch (`set_epoch`). Rows are converted, encoded and checked
for `max_length` as they arrive, one optimizer step at a time, and every process reads the same
stream and takes its slice of each global batch, as `alignlab.data.order` does.

Resuming: the loader's state is (epoch, the stream position its current optimizer step starts at,
micro-batches of that step already trained), saved in every checkpoint. A resumed run replays the
epoch's shuffled stream from its start, skipping that many rows without converting or encoding them,
so it continues exactly where it stopped (the shuffle buffer refills as it did), at the cost of
reading the skipped rows again.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset

from alignlab.data.order import process_group
from alignlab.errors import ConfigError

log = logging.getLogger(__name__)

STREAM_KINDS = ("sft", "pairwise", "prompt")  # KTO's partners are drawn over the whole set
PEEK_ROWS = 64  # rows read and converted before anything is written (the rest are checked as they come)


class RowStream:
    """A streamed train split: records of a `datasets.IterableDataset` turned into canonical rows.

    `convert(record, position)` gives the canonical row of a record, None for a bad row left out
    (data.on_bad_row=skip), or raises DataError naming file, row and field; `forget(rows)` drops what
    the source keeps about rows once they are encoded (their file and row, for errors), so that a long
    stream does not fill memory.

    A source that streams returns one as the train split of its `load` (FileSource._stream), after
    setting `head` (the canonical rows of the first PEEK_ROWS records, checked before anything is
    written) and `whole` (whether those were all of them). `dataset` needs `take`, `shuffle(seed,
    buffer_size)` and `set_epoch`, as a `datasets.IterableDataset` has.
    """

    def __init__(
        self,
        dataset: Any,
        describe: str,
        shuffle_buffer: int,
        convert: Callable[[Any, int], dict | None],
        forget: Callable[[list[dict]], None] = lambda rows: None,
    ):
        self.dataset, self.name, self.shuffle_buffer = dataset, describe, shuffle_buffer
        self.convert, self.forget = convert, forget
        self.head: list[dict] = []  # the canonical rows of the first records, as checked when the stream opened
        self.whole = False  # whether those are all its rows (a stream shorter than PEEK_ROWS)

    def rows(self, epoch: int, seed: int, shuffle: bool, start: int = 0) -> Iterator[tuple[int, dict]]:
        """(position in the epoch's stream, canonical row) from position `start` on: the stream shuffled
        by `seed` and `epoch` (a buffer of `shuffle_buffer` rows) unless `shuffle` is false."""
        dataset = self.dataset
        if shuffle:
            dataset = dataset.shuffle(seed=seed, buffer_size=self.shuffle_buffer)
            dataset.set_epoch(epoch)
        for position, record in enumerate(dataset):
            if position < start:
                continue
            row = self.convert(record, position)
            if row is not None:
                yield position, row

    def describe(self) -> str:
        return self.name


def check_streaming(data: Any, algorithm: Any, kind: str) -> None:
    """What streaming cannot do, refused before anything loads.

    Raises:
        ConfigError: a labelled (KTO) data kind; `data.group_by_length`; `data.sources`; an algorithm
            option that needs every row up front (`precompute_ref_log_probs`, `dynamic_sample`); a
            `shuffle_buffer` below 1. Each names its key and what to do.
    """
    source = data.get("source") or {}
    if not source.get("streaming"):
        return
    if kind not in STREAM_KINDS:
        raise ConfigError(
            f"data.source.streaming=true reads {', '.join(STREAM_KINDS)} data; {kind} data (KTO) pairs every row "
            "with a partner drawn over the whole set, so it needs data.source.streaming=false"
        )
    buffer = source.get("shuffle_buffer", 1000)
    if isinstance(buffer, bool) or not isinstance(buffer, int) or buffer < 1:
        raise ConfigError(f"data.source.shuffle_buffer must be a whole number >= 1, got {buffer!r}")
    if data.get("group_by_length"):
        raise ConfigError(
            "data.group_by_length=true sorts rows by length, which needs the whole data set; a stream "
            "(data.source.streaming=true) cannot: set data.group_by_length=false"
        )
    if data.get("sources"):
        raise ConfigError("data.sources (a mixture) is read in memory; set data.source.streaming=false to mix")
    for key, why in (
        ("precompute_ref_log_probs", "scores every row with the reference before the first step"),
        ("dynamic_sample", "draws replacement prompts from the whole train split"),
    ):
        if algorithm.get(key):
            raise ConfigError(
                f"algorithm.{key}=true {why}, which a stream (data.source.streaming=true) does not hold; set "
                f"algorithm.{key}=false"
            )


class StreamOrder:
    """Where training is in a stream (see the module docstring): epoch, the stream position the current
    optimizer step starts at, and that step's micro-batches already trained."""

    def __init__(self):
        self.epoch, self.start, self.micro = 0, 0, 0

    def advance(self, state: tuple[int, int, int]) -> None:
        """A batch is about to be trained on: from now on a checkpoint counts it (`state`: the position after it)."""
        self.epoch, self.start, self.micro = (int(v) for v in state)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "start": self.start, "micro": self.micro}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.start, self.micro = int(state["epoch"]), int(state["start"]), int(state["micro"])


class _StreamBatches(IterableDataset):
    """Collated training micro-batches of a stream, from the order's position on; each carries its
    optimizer step's `step_totals` and, under `stream_position`, the order's state after it (which the
    data module's `on_before_batch_transfer` takes off)."""

    def __init__(self, datamodule: Any, order: StreamOrder, accumulate: int):
        self.dm, self.order, self.accumulate = datamodule, order, accumulate

    def _steps(self, epoch: int, start: int, world: int) -> Iterator[tuple[int, list[dict], int]]:
        """(stream position the step starts at, its encoded rows, position the next step starts at)."""
        dm = self.dm
        size = dm.batch_size * world
        per_step = size * self.accumulate
        kept: list[dict] = []
        pending: list[tuple[int, dict]] = []
        step_start, last = start, start - 1

        def encode() -> None:
            rows = [r for _, r in pending]
            kept.extend(ex for _, ex in dm.encode_stream_rows(rows, [p for p, _ in pending], epoch == 0))
            dm.stream.forget(rows)
            pending.clear()

        rows = dm.stream.rows(epoch, dm.seed, dm.shuffle, start)
        for item in itertools.chain(rows, [None]):  # None: the stream's end, where the rest is encoded
            if item is not None:
                pending.append(item)
                last = item[0]
                if len(pending) < per_step:
                    continue
            encode()
            while len(kept) >= per_step:
                step, kept[:] = kept[:per_step], kept[per_step:]
                following = kept[0]["index"] if kept else last + 1
                yield step_start, step, following
                step_start = following
        if kept:  # the epoch's last, short step: global batches of `size` rows, as alignlab.data.order cuts them
            pieces = [kept[i : i + size] for i in range(0, len(kept), size)]
            if len(pieces[-1]) < size and (dm.drop_last_train or len(pieces[-1]) < world):
                pieces.pop()
            if pieces:
                yield step_start, [ex for piece in pieces for ex in piece], last + 1

    def __iter__(self):
        rank, world = process_group()
        dm, order = self.dm, self.order
        epoch, start, micro = order.epoch, order.start, order.micro
        size = dm.batch_size * world
        steps = self._steps(epoch, start, world)
        current = next(steps, None)
        if current is None:
            if start == 0:
                raise dm.unusable("train", dm.dropped_by_reason.get("train", {}), None)
            order.advance((epoch + 1, 0, 0))  # stopped right at the epoch's end: the next one starts afresh
        while current is not None:
            following = next(steps, None)
            step_start, rows, next_start = current
            pieces = [rows[i : i + size] for i in range(0, len(rows), size)]
            totals = {"rows": len(rows)}
            for ex in rows:
                for name, count in dm.step_counts(ex).items():
                    totals[name] = totals.get(name, 0) + count
            after = (epoch, next_start, 0) if following is not None else (epoch + 1, 0, 0)
            for j, piece in enumerate(pieces):
                if j < micro:  # resumed within this step: these were trained
                    continue
                mine = torch.arange(len(piece)).tensor_split(world)[rank].tolist()
                batch = dm.collate([piece[i] for i in mine], with_prompts=False)
                batch["step_totals"] = dict(totals)
                batch["stream_position"] = after if j == len(pieces) - 1 else (epoch, step_start, j + 1)
                yield batch
            micro, current = 0, following


def _as_is(batch: dict) -> dict:
    return batch


class StreamLoader(DataLoader):
    """The training loader of a stream: batches already collated; its position Lightning saves and restores."""

    def __init__(self, datamodule: Any, order: StreamOrder, accumulate: int):
        super().__init__(_StreamBatches(datamodule, order, accumulate), batch_size=None, collate_fn=_as_is)
        self.order = order

    def state_dict(self) -> dict:
        return self.order.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.order.load_state_dict(state)
