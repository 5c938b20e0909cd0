"""The training order: the same for any number of processes, and resumable mid-epoch.

Epoch e shuffles every row with the permutation a shuffled DataLoader(generator=manual_seed(seed))
draws for its e-th epoch, and cuts it into global batches of batch_size × world_size rows; process
r takes the r-th contiguous slice of each. So one process trains in exactly PyTorch's usual order.
So a 2-process run sees exactly the rows a 1-process run with twice the batch size sees, and a
restored run knows where it stopped: the loader's state (epoch, batches consumed) is saved in every
Lightning checkpoint and the resumed epoch skips what was already trained on.

An optimizer step is `accumulate` consecutive global batches from the start of the epoch (the last
step of an epoch may have fewer), as Lightning accumulates; so the sampler also knows each step's
totals over all its micro-batches and processes (rows, answer tokens), which the losses divide by.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader


def process_group() -> tuple[int, int]:
    """(rank, world size) of this process; (0, 1) outside torch.distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class GlobalBatchSampler:
    """Per-process batches of row indices (see the module docstring)."""

    def __init__(
        self,
        n_rows: int,
        batch_size: int,
        seed: int,
        drop_last: bool,
        shuffle: bool = True,
        lengths: list[int] | None = None,
        accumulate: int = 1,
        counts: dict[str, list[int]] | None = None,
    ):
        """`lengths` (tokens per row) turns on grouping by length within each optimizer step of
        `accumulate` micro-batches: the step's rows are sorted by length before being cut into its
        micro-batches, so each micro-batch pads little while the step trains on the same rows.
        `counts`: per-row numbers (name -> one int per row, e.g. answer tokens) that `step_totals`
        adds up over each optimizer step."""
        self.n_rows, self.batch_size, self.seed = n_rows, batch_size, seed
        self.drop_last, self.shuffle = drop_last, shuffle
        self.lengths, self.accumulate = lengths, accumulate
        self.counts = {name: torch.tensor(values, dtype=torch.long) for name, values in (counts or {}).items()}
        self.epoch, self.consumed = 0, 0  # batches of `epoch` already trained on
        # ((epoch, world), per global batch (its rows, its step's totals)), computed once per epoch
        self._totals: tuple[tuple[int, int], list[tuple[set, dict[str, int]]]] | None = None

    def _global_batches(self, world: int) -> list[torch.Tensor]:
        order = self._permutation() if self.shuffle else torch.arange(self.n_rows)
        size = self.batch_size * world
        batches = list(order.split(size))
        if batches and len(batches[-1]) < size and (self.drop_last or len(batches[-1]) < world):
            batches.pop()  # a short last batch, when kept, must still give every process a row
        if self.lengths is not None and self.accumulate > 1:
            batches = self._grouped(batches, world)
        return batches

    def _grouped(self, batches: list[torch.Tensor], world: int) -> list[torch.Tensor]:
        """Each optimizer step's global batches re-cut from its rows sorted by length (longest first),
        sizes kept. A global batch's rows go to the processes in turn (row i to process i mod world),
        so every process gets rows of about the same length."""
        lengths = torch.tensor(self.lengths)
        out = []
        for start in range(0, len(batches), self.accumulate):
            step = batches[start : start + self.accumulate]
            rows = torch.cat(step)
            rows = rows[torch.sort(lengths[rows], descending=True, stable=True).indices]
            for piece in rows.split([len(b) for b in step]):
                out.append(torch.cat([piece[r::world] for r in range(world)]))  # tensor_split: r-th slice
        return out

    def _permutation(self) -> torch.Tensor:
        """This epoch's order, replayed from the seed: per epoch a DataLoader draws its iterator's base
        seed, then RandomSampler draws the permutation and, when exhausted, an unused tail one."""
        generator = torch.Generator().manual_seed(self.seed)
        for _ in range(self.epoch + 1):
            torch.empty((), dtype=torch.int64).random_(generator=generator)
            order = torch.randperm(self.n_rows, generator=generator)
            torch.randperm(self.n_rows, generator=generator)
        return order

    def __len__(self) -> int:
        _, world = process_group()
        size = self.batch_size * world
        full, rest = divmod(self.n_rows, size)
        return full + (1 if rest and not self.drop_last and rest >= world else 0)

    def __iter__(self):
        rank, world = process_group()
        for batch in self._global_batches(world)[self.consumed :]:
            yield batch.tensor_split(world)[rank].tolist()  # contiguous slices; a short batch splits evenly

    def step_totals(self, position: int, rows: list[int] | None = None) -> dict[str, int]:
        """The totals of the optimizer step that global batch `position` of this epoch belongs to, over
        all its micro-batches and processes: "rows" and each of `counts`. `rows` (the row indices a
        process received in that batch) are checked to belong to it, so a loader that ever strayed from
        this order stops instead of normalising by another step's totals.

        Raises:
            RuntimeError: when `rows` are not in that global batch.
        """
        _, world = process_group()
        if self._totals is None or self._totals[0] != (self.epoch, world):
            self._totals = ((self.epoch, world), self._step_totals(world))
        members, totals = self._totals[1][position]
        if rows is not None and not set(rows) <= members:
            raise RuntimeError(
                f"batch {position} of epoch {self.epoch} holds rows outside the training order's batch there; "
                "its optimizer step's totals are unknown"
            )
        return totals

    def _step_totals(self, world: int) -> list[tuple[set, dict[str, int]]]:
        """Per global batch of the epoch: (its rows, its optimizer step's totals)."""
        batches = self._global_batches(world)
        out = []
        for start in range(0, len(batches), self.accumulate):
            step = batches[start : start + self.accumulate]
            rows = torch.cat(step)
            totals = {"rows": len(rows), **{name: int(c[rows].sum()) for name, c in self.counts.items()}}
            out.extend((set(b.tolist()), totals) for b in step)
        return out

    def step(self) -> None:
        """One batch was trained on (called as it starts, so a checkpoint taken after it counts it)."""
        self.consumed += 1
        if self.consumed >= len(self):
            self.epoch, self.consumed = self.epoch + 1, 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "consumed": self.consumed}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.consumed = int(state["epoch"]), int(state["consumed"])


class ResumableLoader(DataLoader):
    """A DataLoader over a GlobalBatchSampler whose position Lightning saves and restores."""

    def __init__(self, dataset, sampler: GlobalBatchSampler, **kwargs):
        super().__init__(dataset, batch_sampler=sampler, **kwargs)

    def state_dict(self) -> dict:
        return self.batch_sampler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.batch_sampler.load_state_dict(state)
