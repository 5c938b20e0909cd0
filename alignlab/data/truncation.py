"""What happens to a row whose prompt does not fit `max_length` (`data.truncation`).

A prompt does not fit when it alone leaves no room for one answer token (prompt-only rows: for one
generated token). Rows whose prompt fits are never changed here; their answers are cut from the end as
always (`alignlab.data.tokenize.fit_answer`).

- `drop_row` (default): the row is left out and counted (`prompt_too_long`).
- `error`: the run stops, naming the file, the row and `max_length`.
- `keep_end`: the oldest turns of the conversation are dropped, one turn (a user message and the
  replies after it) at a time, keeping the leading system messages and the last user turn, until the
  prompt and its answer fit (TRL's `keep_end` keeps the end of a sequence; this keeps it turn by turn,
  so the template still sees a well-formed conversation).
- `keep_start`: the last user message's text is cut from its end (the start of a long document is
  kept, as TRL's `keep_start` keeps the start of a sequence); never to blank text, which would be an
  empty message (alignlab.data.formats.blank).
Both shorten the prompt until prompt + answer fit, counting at most half of `max_length` for the
answer (a longer answer is then cut from its end), but for a pair at least its answers' shared start and
the first token that differs (so that the cut answers still differ), and leave the row out
(`prompt_too_long`) when even the shortest prompt they allow does not fit. Rows with images are not
shortened (their `<image>` placeholders must match their images): they are left out as with `drop_row`.

How long max_length is: the bundled tasks give 128; the custom data configs give `auto`, which
`auto_max_length` turns into the length 95% of the train rows fit within, at most the model's positions
(`model_positions`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

from alignlab.data.formats import blank

TRUNCATION = ("drop_row", "keep_start", "keep_end", "error")

# `max_length` values that leave the length to the data and the model (`auto_max_length`); the custom data
# configs default to `auto`, the bundled tasks keep 128.
AUTO_LENGTH = ("auto", None)
AUTO_COVERAGE = 0.95  # the share of train rows that max_length=auto keeps whole
AUTO_MULTIPLE = 64  # max_length=auto is rounded up to a multiple of this


def model_positions(config: Any) -> int | None:
    """The positions a model's config gives it (`max_position_embeddings`, GPT-2's `n_positions`; a
    vision-language model's from its `text_config`); None when it names none."""
    for cfg in (config, getattr(config, "text_config", None)):
        for name in ("max_position_embeddings", "n_positions"):
            value = getattr(cfg, name, None)
            if isinstance(value, int) and value > 0:
                return value
    return None


def auto_max_length(lengths: Sequence[int], positions: int | None) -> tuple[int, int]:
    """`max_length=auto` for rows of these token counts (prompt plus its longest answer): the count that
    `AUTO_COVERAGE` of the rows stay within, rounded up to a multiple of `AUTO_MULTIPLE`, at most the
    model's `positions` (None: no bound). Returns (that length, the uncapped count the rows need).

    Raises:
        ValueError: no lengths.
    """
    if not lengths:
        raise ValueError("max_length=auto needs at least one row to measure")
    ordered = sorted(lengths)
    needed = ordered[max(0, math.ceil(AUTO_COVERAGE * len(ordered)) - 1)]
    length = max(2, -(-needed // AUTO_MULTIPLE) * AUTO_MULTIPLE)
    return (min(length, positions) if positions else length), needed


def turns_dropped(messages: list[dict]) -> list[list[dict]]:
    """The prompt with its 1, 2, … oldest turns dropped (keep_end), shortest last. The leading system
    messages and the last user turn (the last user message and what follows it) are always kept; a turn
    is a user message and the messages after it up to the next user message (messages before the first
    user message that are not system messages count as a turn of their own)."""
    head = 0
    while head < len(messages) and messages[head]["role"] == "system":
        head += 1
    users = [i for i in range(head, len(messages)) if messages[i]["role"] == "user"]
    if not users:
        return []
    last = users[-1]
    starts = sorted({head, *[i for i in users if i < last]} - {last})  # where each droppable turn begins
    if not starts:
        return []
    return [messages[:head] + messages[start:] for start in starts[1:] + [last]]


def shorten_prompt(
    messages: list[dict],
    mode: str,
    length: Callable[[list[dict]], int],
    answer: int,
    max_length: int,
    distinct: int = 0,
) -> list[dict] | None:
    """A shorter prompt under `mode` (keep_end or keep_start, see the module docstring) whose token count,
    by `length(messages)`, leaves room for `max(min(answer, max_length // 2), distinct)` answer tokens;
    when none does, the shortest one allowed if it leaves room for one; else None (the row is left out).

    Args:
        messages: the prompt that does not fit.
        length: the prompt's token count as the chat template lays it out.
        answer: the longest answer's token count (0 for prompt-only rows).
        distinct: answer tokens a pair needs to stay a pair: its answers' shared first tokens and the
            first that differs (0 for one answer). Cut to fewer, chosen and rejected would be the same
            tokens and the row would be dropped.
    Raises:
        ValueError: a `mode` that is neither keep_end nor keep_start.
    """
    room = max(min(answer, max_length // 2), min(distinct, answer), 1)

    def fits(m: list[dict]) -> bool:
        return length(m) + room <= max_length

    if mode == "keep_end":
        return _keep_end(messages, fits, length, max_length)
    if mode == "keep_start":
        return _keep_start(messages, fits, length, max_length)
    raise ValueError(f"data.truncation must be one of {TRUNCATION}, got {mode!r}")


def _keep_end(messages: list[dict], fits: Callable, length: Callable, max_length: int) -> list[dict] | None:
    """keep_end: the prompt with the fewest oldest turns dropped (`turns_dropped`) that `fits`; else the
    shortest such prompt if it leaves room for one answer token; else None."""
    options = turns_dropped(messages)
    best = next((m for m in options if fits(m)), None)
    if best is None and options and length(options[-1]) < max_length:
        best = options[-1]
    return best


def _keep_start(messages: list[dict], fits: Callable, length: Callable, max_length: int) -> list[dict] | None:
    """keep_start: the prompt with its last user message cut to the longest start (one character at
    least, not blank) that `fits`; else to the longest that leaves room for one answer token; else None."""
    last = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=None)
    if last is None:
        return None
    text = messages[last]["content"]

    def cut(n: int) -> list[dict]:
        return [*messages[:last], {**messages[last], "content": text[:n]}, *messages[last + 1 :]]

    for test in (fits, lambda m: length(m) < max_length):  # the longest cut that fits, one character at least
        lo, hi, best = 1, len(text) - 1, None
        while lo <= hi:
            mid = (lo + hi) // 2
            if test(cut(mid)):
                best, lo = mid, mid + 1
            else:
                hi = mid - 1
        if best is not None and not blank(text[:best]):  # a cut to blank text would be an empty message
            return cut(best)
    return None
