"""The bundled tool-calling task: sums of two 6-digit numbers, which the tiny model cannot do in its
head, with the `calculator` tool (alignlab.tools.calculator).

Prompt rows ask `a+b=` and carry `solution`. SFT rows are correct tool-call traces in the Hermes format
(`<tool_call>{json}</tool_call>`), one row per assistant turn, each row's prompt the conversation before
that turn: the call itself (after the question), then the final answer (after the call and the tool's
result). Training on both rows is multi-turn SFT with the loss on assistant turns only: the tool's
result is never a training target. Problems are drawn from a seed; held-out ones never appear in training.
"""

from __future__ import annotations

import json
import random

from alignlab.data.rows import KINDS


def tool_call_text(a: int, b: int) -> str:
    """The assistant turn that calls the calculator on a+b, as the Hermes format writes it (compact JSON:
    every character is a token for the byte-level tiny model)."""
    call = {"name": "calculator", "arguments": {"expression": f"{a}+{b}"}}
    return f"<tool_call>{json.dumps(call, separators=(',', ':'))}</tool_call>"


class ArithToolsTask:
    """`a+b=` for digits-digit operands (default 6: 100000..999999); `solution` is the sum.

    kind `prompt`: {"prompt", "solution"}; kind `sft`: two rows per problem, the tool call and the answer
    after the tool's result (see the module docstring). Other kinds are not offered.
    """

    name = "arith_tools"

    def __init__(self, seed: int = 4321, n_train: int = 2000, n_eval: int = 128, digits: int = 6):
        if digits < 1:
            raise ValueError(f"digits must be >= 1, got {digits}")
        low, high = 10 ** (digits - 1), 10**digits - 1
        if (high - low + 1) ** 2 <= n_train + n_eval:
            raise ValueError(f"{digits}-digit operands give too few problems for n_train + n_eval = {n_train + n_eval}")
        self.seed, self.n_train, self.n_eval, self.digits = seed, n_train, n_eval, digits
        self.low, self.high = low, high

    def _problems(self) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
        rng, seen, pairs = random.Random(self.seed), set(), []
        while len(pairs) < self.n_train + self.n_eval:
            pair = (rng.randint(self.low, self.high), rng.randint(self.low, self.high))
            if pair not in seen:
                seen.add(pair)
                pairs.append(pair)
        return pairs[self.n_eval :], pairs[: self.n_eval]

    @staticmethod
    def _rows(a: int, b: int, kind: str) -> list[dict]:
        question, right = [{"role": "user", "content": f"{a}+{b}="}], str(a + b)
        if kind == "prompt":
            return [{"prompt": question, "solution": right}]
        call = tool_call_text(a, b)
        after_call = [*question, {"role": "assistant", "content": call}, {"role": "tool", "content": right}]
        return [
            {"prompt": question, "completion": call, "solution": right},
            {"prompt": after_call, "completion": right, "solution": right},
        ]

    def load(self, kind: str, on_bad_row: str = "error") -> dict[str, list[dict]]:
        """Rows of `kind` (`prompt` or `sft`) for the `train` and `eval` splits (generated rows are never bad)."""
        if kind not in KINDS or kind not in ("prompt", "sft"):
            raise ValueError(f"the arith_tools task offers the data kinds prompt and sft, not {kind!r}")
        train, held_out = self._problems()
        return {
            "train": [row for a, b in train for row in self._rows(a, b, kind)],
            "eval": [row for a, b in held_out for row in self._rows(a, b, kind)],
        }

    def describe(self) -> str:
        return f"bundled tool-calling arithmetic (seed {self.seed}, {self.digits}-digit operands, calculator tool)"
