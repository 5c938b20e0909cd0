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

With a token budget (`data.max_tokens_per_micro_batch`, the field's "dynamic batch size") a step holds
the same rows (batch_size × accumulate × world consecutive rows of the permutation), but they are
sorted by length and cut by tokens instead: into `micro_batches` pieces of about equal padded size,
the smallest count that keeps every step the run will take within the budget (`plan_micro_batches`).
Lightning accumulates a fixed number of micro-batches per step, hence one count for the whole run.
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


def padded_tokens(lengths: list[int], world: int = 1) -> int:
    """Tokens one process pads a micro-batch to: its share of the rows (ceil(n / world): process 0
    holds the most) × the longest row. `lengths`: the micro-batch's rows' tokens, longest first."""
    return -(-len(lengths) // world) * lengths[0] if lengths else 0


def cut_count(lengths: list[int], budget: int, world: int = 1) -> int:
    """The fewest contiguous micro-batches of at least `world` rows each that keep every one within
    `budget` padded tokens per process (`padded_tokens`), for rows sorted longest first. Greedy (each
    micro-batch takes rows while they fit) is optimal here: a micro-batch's cost only grows with its
    rows. A row too long for the budget on its own still gets one micro-batch (of `world` rows)."""
    count, start = 0, 0
    while start < len(lengths):
        end = min(start + world, len(lengths))
        while end < len(lengths) and -(-(end + 1 - start) // world) * lengths[start] <= budget:  # padded_tokens
            end += 1
        count, start = count + 1, end
    return count


def balanced_cut(lengths: list[int], pieces: int, world: int = 1) -> list[int]:
    """Sizes of exactly `pieces` contiguous micro-batches (each >= `world` rows) of rows sorted longest
    first, with the largest padded size (`padded_tokens`) as small as it can be: so that a step cut into
    more micro-batches than it needs still has micro-batches of about equal tokens.

    Raises:
        ValueError: when `pieces` × `world` exceeds the rows.
    """
    if not 1 <= pieces <= len(lengths) // world:
        raise ValueError(f"cannot cut {len(lengths)} rows into {pieces} micro-batches of at least {world} rows")
    low, high = 0, padded_tokens(lengths, world)  # the smallest feasible cap, by bisection
    while low < high:
        cap = (low + high) // 2
        low, high = (low, cap) if cut_count(lengths, cap, world) <= pieces else (cap + 1, high)
    sizes, start = [], 0
    while start < len(lengths):
        end = min(start + world, len(lengths))
        while end < len(lengths) and -(-(end + 1 - start) // world) * lengths[start] <= low:
            end += 1
        sizes.append(end - start)
        start = end
    while len(sizes) < pieces:  # fewer were needed: halve the costliest that can be halved (never costlier)
        starts = [sum(sizes[:i]) for i in range(len(sizes))]
        i = max(
            (j for j, n in enumerate(sizes) if n >= 2 * world),
            key=lambda j: padded_tokens(lengths[starts[j] : starts[j] + sizes[j]], world),
        )
        half = max(world, (sizes[i] // 2) // world * world)
        sizes[i : i + 1] = [half, sizes[i] - half]
    return sizes


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
        token_budget: int | None = None,
    ):
        """`lengths` (tokens per row) turns on grouping by length within each optimizer step of
        `accumulate` micro-batches: the step's rows are sorted by length before being cut into its
        micro-batches, so each micro-batch pads little while the step trains on the same rows.
        `counts`: per-row numbers (name -> one int per row, e.g. answer tokens) that `step_totals`
        adds up over each optimizer step. `token_budget` (needs `lengths`, then each row's padded
        tokens with all its sequences counted): steps cut by tokens (module docstring); call
        `plan_micro_batches` before iterating, or each step is one micro-batch.

        Raises:
            ValueError: a token budget without lengths.
        """
        if token_budget is not None and lengths is None:
            raise ValueError("a token budget needs the rows' lengths")
        self.n_rows, self.batch_size, self.seed = n_rows, batch_size, seed
        self.drop_last, self.shuffle = drop_last, shuffle
        self.lengths, self.accumulate = lengths, accumulate
        self._lengths = None if lengths is None else torch.tensor(lengths)  # for sorting, made once
        self.token_budget, self.micro_batches = token_budget, 1
        self.counts = {name: torch.tensor(values, dtype=torch.long) for name, values in (counts or {}).items()}
        self.epoch, self.consumed = 0, 0  # batches of `epoch` already trained on
        # ((epoch, world), per global batch (its rows, its step's totals)), computed once per epoch
        self._totals: tuple[tuple[int, int], list[tuple[set, dict[str, int]]]] | None = None

    # -- the order ----------------------------------------------------------------------------------
    def _steps(self, world: int, epoch: int) -> list[list[torch.Tensor]]:
        """The global batches of `epoch`, grouped by optimizer step."""
        order = self._permutation(epoch) if self.shuffle else torch.arange(self.n_rows)
        if self.token_budget is not None:
            return [self._cut_by_tokens(rows, world) for rows in self._split(order, self.accumulate, world)]
        batches = self._split(order, 1, world)
        steps = [batches[i : i + self.accumulate] for i in range(0, len(batches), self.accumulate)]
        if self.lengths is not None and self.accumulate > 1:
            steps = [self._grouped(step, world) for step in steps]
        return steps

    def _split(self, order: torch.Tensor, batches: int, world: int) -> list[torch.Tensor]:
        """`order` in pieces of `batches` global batches; a short last piece, when kept (not drop_last),
        must still give every process a row."""
        size = self.batch_size * batches * world
        pieces = list(order.split(size))
        if pieces and len(pieces[-1]) < size and (self.drop_last or len(pieces[-1]) < world):
            pieces.pop()
        return pieces

    def _longest_first(self, rows: torch.Tensor) -> torch.Tensor:
        return rows[torch.sort(self._lengths[rows], descending=True, stable=True).indices]

    def _grouped(self, step: list[torch.Tensor], world: int) -> list[torch.Tensor]:
        """A step's global batches re-cut from its rows sorted by length (longest first), sizes kept."""
        rows = self._longest_first(torch.cat(step))
        return [self._to_processes(piece, world) for piece in rows.split([len(b) for b in step])]

    def _cut_by_tokens(self, rows: torch.Tensor, world: int) -> list[torch.Tensor]:
        """A step's rows in `micro_batches` global batches of about equal padded tokens (fewer for a
        short last step); a step of one micro-batch keeps the permutation's order (nothing to group)."""
        pieces = min(self.micro_batches, len(rows) // world)
        if pieces == 1:
            return [rows]
        rows = self._longest_first(rows)
        sizes = balanced_cut([self.lengths[i] for i in rows.tolist()], pieces, world)
        return [self._to_processes(piece, world) for piece in rows.split(sizes)]

    @staticmethod
    def _to_processes(piece: torch.Tensor, world: int) -> torch.Tensor:
        """Rows of a length-sorted global batch arranged so that process r's contiguous slice
        (tensor_split) holds rows r, r + world, …: every process gets rows of about the same length."""
        return torch.cat([piece[r::world] for r in range(world)])

    def plan_micro_batches(self, world: int, epochs: int) -> int:
        """Fix `micro_batches` under the token budget: the fewest per step that keep every step of the
        first `epochs` epochs within it (`cut_count`), at most one per `world` rows. Returns it."""
        self.micro_batches = 1
        counts = [1]
        for epoch in range(epochs):
            for (rows,) in self._steps(world, epoch):  # one micro-batch per step while planning
                sorted_lengths = [self.lengths[i] for i in self._longest_first(rows).tolist()]
                counts.append(cut_count(sorted_lengths, self.token_budget, world))
        self.micro_batches = min(max(counts), self.batch_size * self.accumulate)
        return self.micro_batches

    def _global_batches(self, world: int) -> list[torch.Tensor]:
        return [batch for step in self._steps(world, self.epoch) for batch in step]

    def _permutation(self, epoch: int | None = None) -> torch.Tensor:
        """Epoch `epoch`'s order (default: the current one), replayed from the seed: per epoch a
        DataLoader draws its iterator's base seed, then RandomSampler draws the permutation and, when
        exhausted, an unused tail one."""
        generator = torch.Generator().manual_seed(self.seed)
        for _ in range((self.epoch if epoch is None else epoch) + 1):
            torch.empty((), dtype=torch.int64).random_(generator=generator)
            order = torch.randperm(self.n_rows, generator=generator)
            torch.randperm(self.n_rows, generator=generator)
        return order

    def __len__(self) -> int:
        _, world = process_group()
        if self.token_budget is not None:
            size = self.batch_size * self.accumulate * world
            full, rest = divmod(self.n_rows, size)
            last = 0 if self.drop_last and rest else min(self.micro_batches, rest // world)
            return full * self.micro_batches + last
        size = self.batch_size * world
        full, rest = divmod(self.n_rows, size)
        return full + (1 if rest and not self.drop_last and rest >= world else 0)

    def __iter__(self):
        rank, world = process_group()
        for batch in self._global_batches(world)[self.consumed :]:
            yield batch.tensor_split(world)[rank].tolist()  # contiguous slices; a short batch splits evenly

    # -- what each step holds -----------------------------------------------------------------------
    def step_totals(self, position: int, rows: list[int] | None = None) -> dict[str, int]:
        """The totals of the optimizer step that global batch `position` of this epoch belongs to, over
        all its micro-batches and processes: "rows" and each of `counts`. `rows` (the row indices a
        process received in that batch) are checked to belong to it, so a loader that ever strayed from
        this order stops instead of normalising by another step's totals.

        Raises:
            RuntimeError: when `rows` are not in that global batch.
        """
        members, totals, _ = self._step_of(position)
        if rows is not None and not set(rows) <= members:
            raise RuntimeError(
                f"batch {position} of epoch {self.epoch} holds rows outside the training order's batch there; "
                "its optimizer step's totals are unknown"
            )
        return totals

    def step_rows(self, position: int) -> list[list[int]]:
        """This process's rows in each micro-batch of the step that global batch `position` belongs to
        (e.g. for KTO's z₀, estimated over the whole step)."""
        return self._step_of(position)[2]

    def _step_of(self, position: int) -> tuple[set, dict[str, int], list[list[int]]]:
        rank, world = process_group()
        if self._totals is None or self._totals[0] != (self.epoch, world):
            self._totals = ((self.epoch, world), self._describe_steps(rank, world))
        return self._totals[1][position]

    def _describe_steps(self, rank: int, world: int) -> list[tuple[set, dict[str, int], list[list[int]]]]:
        """Per global batch of the epoch: (its rows, its optimizer step's totals, this process's rows
        in each of the step's micro-batches)."""
        out = []
        for step in self._steps(world, self.epoch):
            rows = torch.cat(step)
            totals = {"rows": len(rows), **{name: int(c[rows].sum()) for name, c in self.counts.items()}}
            mine = [b.tensor_split(world)[rank].tolist() for b in step]
            out.extend((set(b.tolist()), totals, mine) for b in step)
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
