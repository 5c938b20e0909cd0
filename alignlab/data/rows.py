"""Canonical rows for the data kinds, and the conversion from the file formats users bring.

Canonical form (what every DataModule reads), prompts are always message lists:
- prompt:   {"prompt": [messages], **extra}
- sft:      {"prompt": [messages], "completion": str, **extra}
- pairwise: {"prompt": [messages], "chosen": str, "rejected": str, **extra}
- labelled: {"prompt": [messages], "completion": str, "label": bool, **extra}
Extra columns (e.g. `solution`) pass through untouched for reward functions and evaluation; the
optional numeric columns (`NUMERIC_COLUMNS`, e.g. `margin`) of a pairwise row become floats, and a
row without one (missing, null or an empty CSV cell) simply lacks the key (it then counts as 0).
"""

from __future__ import annotations

import json
import math
from typing import Any

import torch

from alignlab.errors import DataError

KINDS = ("prompt", "sft", "pairwise", "labelled")
ROLES = ("system", "user", "assistant", "tool")
ON_BAD_ROW = ("error", "skip")  # data.on_bad_row: stop at a bad row, or leave it out and count it
NUMERIC_COLUMNS = ("margin",)  # optional per-row numbers of pairwise rows (a reward-model margin)


def _short(text: str, limit: int = 40) -> str:
    return repr(text if len(text) <= limit else text[: limit - 1] + "…")


def _difference(turns: list[dict], expected: list[dict], name: str) -> str:
    """Where two prompt conversations part, in words."""
    for i, (got, want) in enumerate(zip(turns, expected)):
        if got != want:
            return (
                f"message {i} is {got['role']} {_short(got['content'])} where {name} has "
                f"{want['role']} {_short(want['content'])}"
            )
    return f"it has {len(turns)} prompt messages where {name} has {len(expected)}"


class _Row:
    """One raw row plus where it came from, so every complaint names file, row and field."""

    def __init__(self, raw: dict, source: str, index: int):
        self.raw, self.source, self.index = raw, source, index

    def fail(self, field: str, problem: str) -> DataError:
        return DataError(self.source, problem, row=self.index, field=field)

    def has(self, field: str) -> bool:
        return self.raw.get(field) is not None

    def messages(self, field: str, value: Any = None) -> list[dict]:
        value = self.raw.get(field) if value is None else value
        if isinstance(value, str) and field == "messages":
            try:  # CSV cells carry message lists as JSON text
                value = json.loads(value)
            except json.JSONDecodeError as e:
                raise self.fail(field, f"expected a list of messages, got text that is not JSON ({e})") from None
        if not isinstance(value, list) or not value:
            raise self.fail(field, f"expected a non-empty list of messages, got {type(value).__name__}")
        out = []
        for i, m in enumerate(value):
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise self.fail(field, f"message {i} must be an object with 'role' and 'content'")
            if m["role"] not in ROLES:
                raise self.fail(field, f"message {i} has role {m['role']!r}; expected one of {ROLES}")
            if not isinstance(m["content"], str):
                raise self.fail(field, f"message {i} content must be text, got {type(m['content']).__name__}")
            if not m["content"].strip() and m["role"] != "system":  # an empty system prompt is a choice
                raise self.fail(field, f"message {i} ({m['role']}) is empty; only a system message may be empty")
            out.append({"role": m["role"], "content": m["content"]})
        return out

    def prompt(self, field: str = "prompt") -> list[dict]:
        value = self.raw.get(field)
        if isinstance(value, str):
            if not value.strip():
                raise self.fail(field, "prompt is empty")
            return [{"role": "user", "content": value}]
        if not isinstance(value, list):
            raise self.fail(field, f"expected text or a list of messages, got {type(value).__name__}")
        msgs = self.messages(field)
        if msgs[-1]["role"] == "assistant":
            raise self.fail(field, "the prompt ends with an assistant message; the answer belongs elsewhere")
        return msgs

    def answer(self, field: str) -> tuple[list[dict], str]:
        """An answer given as text or as messages ending in the assistant's reply.

        Returns (messages before the reply, reply text); the prefix is non-empty only for the
        implicit-prompt form where `chosen` holds the whole conversation.
        """
        value = self.raw.get(field)
        if value is None:
            raise self.fail(field, "missing")
        if isinstance(value, str):
            prefix, text = [], value
        elif not isinstance(value, list):
            raise self.fail(field, f"expected text or a list of messages, got {type(value).__name__}")
        else:
            msgs = self.messages(field, value)
            if msgs[-1]["role"] != "assistant":
                raise self.fail(field, "must end with an assistant message")
            prefix, text = msgs[:-1], msgs[-1]["content"]
        if not text.strip():
            raise self.fail(field, "the answer is empty")
        return prefix, text

    def label(self, field: str = "label") -> bool:
        value = self.raw.get(field)
        if value is None and (self.has("rejected") or self.has("rejected_response")):
            raise self.fail(
                field,
                "missing: this is a preference pair; set data.unpair=true to train on pairs "
                "as desirable (chosen) and undesirable (rejected) rows",
            )
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("true", "false"):
            return value.strip().lower() == "true"  # CSV has no boolean type
        raise self.fail(field, f"expected true or false, got {value!r}")

    def number(self, field: str) -> float:
        value = self.raw.get(field)
        try:
            if isinstance(value, bool):
                raise ValueError
            number = float(value)  # CSV cells arrive as text
        except (TypeError, ValueError, OverflowError):
            raise self.fail(field, f"expected a number, got {value!r}") from None
        if not math.isfinite(number):
            raise self.fail(field, f"expected a finite number, got {value!r}")
        return number

    def conversation(self) -> tuple[list[dict], str]:
        """`messages` ending in an assistant answer → (prompt messages, answer)."""
        msgs = self.messages("messages")
        if msgs[-1]["role"] != "assistant" or len(msgs) < 2:
            raise self.fail("messages", "must end with an assistant answer after at least one prompt message")
        if not msgs[-1]["content"].strip():
            raise self.fail("messages", "the assistant answer is empty")
        return msgs[:-1], msgs[-1]["content"]

    def follow(self, prompt: list[dict], turns: list[dict], field: str, name: str) -> list[dict]:
        """The conversation an answer in `field` follows: `prompt` (from `name`) plus the `turns` its
        message list holds before the answer. Turns that repeat the whole prompt count once; other
        turns must continue it (start with an assistant turn), else the answer belongs to another
        prompt and the row is refused."""
        if turns[: len(prompt)] == prompt:
            turns = turns[len(prompt) :]
        elif turns and turns[0]["role"] != "assistant":
            raise self.fail(
                field,
                f"its prompt turns differ from {name} ({_difference(turns, prompt, name)}); give the answer "
                "alone, or the whole conversation it answers",
            )
        return prompt + turns

    def prompt_and_answer(self, answer_field: str) -> tuple[list[dict], str]:
        """(prompt messages, answer): `prompt` followed by what the answer field holds before its
        reply (see `follow`), or, without `prompt`, the conversation the answer field holds."""
        prefix, text = self.answer(answer_field)
        if self.has("prompt"):
            return self.follow(self.prompt(), prefix, answer_field, "`prompt`"), text
        if prefix:
            return prefix, text
        raise self.fail("prompt", "missing (give `prompt`, or `messages` in the conversational form)")

    def rejected(self, prompt: list[dict]) -> str:
        """The rejected answer of a pair whose chosen answer follows `prompt`; refused (naming the
        rejected field) when it answers another conversation."""
        if self.has("messages"):
            field, name = "rejected_response", "`messages`"
            prefix, text = self.answer(field)
            own = self.follow(prompt, prefix, field, name)
        else:
            field, name = "rejected", "`chosen`"
            prefix, text = self.answer(field)
            # plain text without `prompt` answers the conversation `chosen` holds (TRL's implicit prompt)
            own = self.prompt_and_answer(field)[0] if prefix or self.has("prompt") else prompt
        if own != prompt:
            raise self.fail(
                field,
                f"answers another conversation than {name} ({_difference(own, prompt, name)}); "
                "both answers of a pair must follow the same prompt",
            )
        return text

    def numbers(self, columns: tuple[str, ...]) -> dict[str, float]:
        """The optional numeric columns this row gives (a null or blank cell counts as not given)."""
        given = [k for k in columns if self.has(k) and not (isinstance(self.raw[k], str) and not self.raw[k].strip())]
        return {k: self.number(k) for k in given}

    def extra(self, used: set[str]) -> dict:
        return {k: v for k, v in self.raw.items() if k not in used}


def to_canonical(raw: dict, kind: str, source: str, index: int) -> dict:
    """Convert one file row to the canonical row of `kind`, or raise DataError naming the field."""
    row = _Row(raw, source, index)
    if not isinstance(raw, dict):
        raise DataError(source, f"expected an object per row, got {type(raw).__name__}", row=index)
    conversational = row.has("messages")
    if kind == "prompt":
        if conversational:
            msgs = row.messages("messages")
            while msgs and msgs[-1]["role"] == "assistant":  # a reference answer is not part of the prompt
                msgs = msgs[:-1]
            if not msgs:
                raise row.fail("messages", "has no prompt message before the assistant answer")
            prompt = msgs
        elif row.has("prompt"):
            prompt = row.prompt()
        else:
            raise row.fail("messages", "missing (give `messages` or `prompt`)")
        return {"prompt": prompt, **row.extra({"messages", "prompt"})}
    if kind == "sft":
        if conversational:
            prompt, completion = row.conversation()
        else:
            field = "completion" if row.has("completion") or not row.has("chosen") else "chosen"
            prompt, completion = row.prompt_and_answer(field)
        used = {"messages", "prompt", "completion", "chosen", "rejected", "rejected_response"}
        return {"prompt": prompt, "completion": completion, **row.extra(used)}
    if kind == "pairwise":
        prompt, chosen = row.conversation() if conversational else row.prompt_and_answer("chosen")
        rejected = row.rejected(prompt)
        if chosen == rejected:
            raise row.fail("rejected", "identical to the chosen answer, so the pair carries no preference")
        used = {"messages", "prompt", "chosen", "rejected", "rejected_response", *NUMERIC_COLUMNS}
        return {
            "prompt": prompt,
            "chosen": chosen,
            "rejected": rejected,
            **row.extra(used),
            **row.numbers(NUMERIC_COLUMNS),
        }
    if kind == "labelled":
        label = row.label()  # first: a preference pair fails here, with the hint to unpair it
        if conversational:
            prompt, completion = row.conversation()
        else:
            prompt, completion = row.prompt_and_answer("completion")
        used = {"messages", "prompt", "completion", "label"}
        return {"prompt": prompt, "completion": completion, "label": label, **row.extra(used)}
    raise ValueError(f"unknown data kind {kind!r}; expected one of {KINDS}")


def mismatch_partners(n: int, seed: int) -> list[int]:
    """For each of n rows, another row whose answer it is paired with for KTO's KL reference point:
    one cycle through a seeded shuffle of the rows, so no row is its own partner (unless n = 1) and
    rows next to each other in the file (e.g. the two halves of an unpaired pair) rarely meet."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    partners = [0] * n
    for j, row in enumerate(order):
        partners[row] = order[j - 1]
    return partners


def unpair(row: dict) -> list[dict]:
    """A canonical pairwise row as two labelled rows: chosen desirable, rejected undesirable."""
    extra = {k: v for k, v in row.items() if k not in ("prompt", "chosen", "rejected")}
    return [
        {"prompt": row["prompt"], "completion": row["chosen"], "label": True, **extra},
        {"prompt": row["prompt"], "completion": row["rejected"], "label": False, **extra},
    ]
