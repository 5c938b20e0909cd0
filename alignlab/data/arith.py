"""The bundled synthetic task: small-number addition with a known answer.

Rows are generated deterministically from a seed, so the same config always yields the same train
and held-out problems, and the held-out problems never appear in training. One generator serves
every data kind; a row carries `solution` (the right answer) in all of them.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from alignlab.data.rows import KINDS


def task_row(kind: str, prompt: list[dict], right: str, wrong: str, index: int, desirable_fraction: float) -> dict:
    """The canonical row of `kind` for a generated question with a known answer (`solution` = `right`):
    pairwise rows prefer `right` to `wrong`; labelled row `index` of a split answers `right` (desirable)
    or `wrong` so that any prefix of the split holds (almost exactly) `desirable_fraction` desirable rows."""
    if kind == "prompt":
        return {"prompt": prompt, "solution": right}
    if kind == "sft":
        return {"prompt": prompt, "completion": right, "solution": right}
    if kind == "pairwise":
        return {"prompt": prompt, "chosen": right, "rejected": wrong, "solution": right}
    # labelled: row i is desirable when the running share of desirable rows is below the target
    desirable = int((index + 1) * desirable_fraction) > int(index * desirable_fraction)
    return {"prompt": prompt, "completion": right if desirable else wrong, "label": desirable, "solution": right}


SOLUTION_FORMATS = ("plain", "latex")


class ArithTask:
    """`a+b=` → `a+b` for 0 ≤ a, b ≤ max_operand; rejected/undesirable answers are wrong sums.

    `solution_format`: `plain` writes answers as integers (`12`); `latex` as LaTeX, `\\boxed{12}` (the
    same problems and wrong answers), for rewards that read mathematics (`accuracy` counts `12`,
    `12.0` and `24/2` right against it).
    """

    name = "arith"

    def __init__(
        self,
        seed: int = 1234,
        n_train: int = 2000,
        n_eval: int = 128,
        max_operand: int = 49,
        desirable_fraction: float = 0.5,
        wrong_offsets: Sequence[int] | None = None,
        solution_format: str = "plain",
    ):
        n_problems = (max_operand + 1) ** 2
        if n_eval >= n_problems:
            raise ValueError(f"n_eval={n_eval} leaves no training problems (only {n_problems} exist)")
        if not 0 <= desirable_fraction <= 1:
            raise ValueError(f"desirable_fraction must be in [0, 1], got {desirable_fraction}")
        self.seed, self.n_train, self.n_eval, self.max_operand = seed, n_train, n_eval, max_operand
        # Wrong answers are the right sum plus an offset drawn from this list (repeat one to weight
        # it). The default ±1..9 never keeps the ones digit, so a reward model trained on it cannot
        # tell a carry slip (off by exactly 10) from the right answer; add ±10 to catch those.
        offsets = list(wrong_offsets) if wrong_offsets is not None else [d for d in range(-9, 10) if d]
        if not offsets or 0 in offsets:
            raise ValueError(f"wrong_offsets must be a non-empty list of non-zero integers, got {wrong_offsets}")
        self.desirable_fraction, self.wrong_offsets = desirable_fraction, offsets
        if solution_format not in SOLUTION_FORMATS:
            raise ValueError(f"solution_format must be one of {SOLUTION_FORMATS}, got {solution_format!r}")
        self.solution_format = solution_format

    def _problems(self) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
        rng = random.Random(self.seed)
        pairs = [(a, b) for a in range(self.max_operand + 1) for b in range(self.max_operand + 1)]
        rng.shuffle(pairs)
        held_out, pool = pairs[: self.n_eval], pairs[self.n_eval :]
        # Training problems are drawn with replacement when n_train exceeds the pool.
        train = [pool[i % len(pool)] for i in range(self.n_train)]
        return train, held_out

    def _wrong(self, rng: random.Random, right: int) -> int:
        offset = rng.choice([d for d in self.wrong_offsets if right + d >= 0] or [abs(d) for d in self.wrong_offsets])
        return right + offset

    def _row(self, a: int, b: int, kind: str, rng: random.Random, index: int) -> dict:
        prompt = [{"role": "user", "content": f"{a}+{b}="}]
        right, wrong = self._written(a + b), self._written(self._wrong(rng, a + b))
        return task_row(kind, prompt, right, wrong, index, self.desirable_fraction)

    def _written(self, answer: int) -> str:
        return f"\\boxed{{{answer}}}" if self.solution_format == "latex" else str(answer)

    def load(self, kind: str, on_bad_row: str = "error") -> dict[str, list[dict]]:
        """Rows of `kind` for the `train` and `eval` splits, in alignlab's canonical form (generated
        rows are never bad, so `on_bad_row` changes nothing)."""
        if kind not in KINDS:
            raise ValueError(f"unknown data kind {kind!r}; expected one of {KINDS}")
        train, held_out = self._problems()
        rng = random.Random(self.seed + 1)
        return {
            "train": [self._row(a, b, kind, rng, i) for i, (a, b) in enumerate(train)],
            "eval": [self._row(a, b, kind, rng, i) for i, (a, b) in enumerate(held_out)],
        }

    def describe(self) -> str:
        latex = ", LaTeX answers" if self.solution_format == "latex" else ""
        return f"bundled arithmetic (seed {self.seed}, operands 0..{self.max_operand}{latex})"
