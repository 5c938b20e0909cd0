"""Canonical rows for the data kinds, and the conversion from the file formats users bring.

Canonical form (what every DataModule reads), prompts are always message lists:
- prompt:   {"prompt": [messages], **extra}
- sft:      {"prompt": [messages], "completion": str, **extra}
- pairwise: {"prompt": [messages], "chosen": str, "rejected": str, **extra}
- labelled: {"prompt": [messages], "completion": str, "label": bool, **extra}
An SFT row's earlier assistant messages may carry `"loss": true/false` (ms-swift's per-message flag:
trained or not, whatever data.train_on says; a final answer marked false ends the row at the last
turn that trains); other kinds' messages never carry it (their prompts are never trained).
Tool calling: an assistant message may carry `tool_calls` (`[{"type": "function", "function": {"name":
str, "arguments": dict}}]`, its `content` "" when it says nothing else) and a `tool` message `name`;
an answer (completion, chosen, rejected) that calls tools is that assistant message (a dict) instead
of text. TRL's, ms-swift's and LLaMA-Factory's spellings are all read into this form
(alignlab.data.formats.agent_turns); the chat template writes the calls (alignlab.data.tokenize).
Extra columns (e.g. `solution`) pass through untouched for reward functions and evaluation; a
`solution` that is an object is refused (a struct's field is mapped by a dotted data.columns name); the
optional numeric columns (`NUMERIC_COLUMNS`, e.g. `margin`) of a pairwise row become floats, and a
row without one (missing, null or an empty CSV cell) simply lacks the key (it then counts as 0).

Multimodal rows: every image is the placeholder `<image>` (`IMAGE_PLACEHOLDER`) at its place in a
prompt message's text, and the row has `images`, one fully loaded PIL RGB image per placeholder in
order (`alignlab.data.images.load_image`); a pairwise row may have `rejected_images` (as many), the
images its rejected answer is about. A row without images has neither key. Files give images as
ms-swift does (`<image>` in the message text plus an `images` column) or as TRL does (content parts
`{"type": "image"}` / `{"type": "text", "text": …}`, the image inline in the part or taken in order
from `images`); parts are joined into one text, so both forms give the same row. A pair's two answers
may be the same text when `rejected_images` differ from `images` (ms-swift's image preference pair;
`rejected_images` alone repeats the chosen text). Videos and audio (`OTHER_MEDIA`) are refused.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from typing import Any

import torch

from alignlab.data.formats import (
    ACCEPTED_FORMS,
    blank,
    columns_override,
    convert_row,
    has_column,
    normalise,
    rename_columns,
    suggest_columns,
)
from alignlab.data.images import ImageError, describe, load_image
from alignlab.errors import DataError
from alignlab.registry import Entry

KINDS = ("prompt", "sft", "pairwise", "labelled")
ROLES = ("system", "user", "assistant", "tool")
ON_BAD_ROW = ("error", "skip")  # data.on_bad_row: stop at a bad row, or leave it out and count it
NUMERIC_COLUMNS = ("margin",)  # optional per-row numbers of pairwise rows (a reward-model margin)
IMAGE_PLACEHOLDER = "<image>"  # where an image sits in a canonical message's text
IMAGE_COLUMNS = ("images", "rejected_images")
# Media alignlab cannot read (LLaMA-Factory's and ms-swift's columns and placeholders): a row that gives
# any is refused, never trained as text.
# (LLaMA-Factory's and ms-swift's columns; `video`/`audio`: the Hub's usual feature names). Column → medium.
OTHER_MEDIA = {
    "videos": "video",
    "audios": "audio",
    "rejected_videos": "video",
    "rejected_audios": "audio",
    "video": "video",
    "audio": "audio",
}
_FROM_COLUMN = object()  # an image slot filled from the `images` column (not inline in its content part)


def tool_calls_of(message) -> list:
    """A message's tool calls ([] for none, or for what is not a message)."""
    calls = message.get("tool_calls") if isinstance(message, dict) else None
    return calls if isinstance(calls, list) else []


def reply(message: dict) -> str | dict:
    """An assistant message as a canonical answer: its text, or, when it calls tools, the message itself
    (`{"role": "assistant", "content": str, "tool_calls": [...]}`), which the chat template renders."""
    if tool_calls_of(message):
        return {"role": "assistant", "content": message["content"], "tool_calls": message["tool_calls"]}
    return message["content"]


def _text_bool(value):
    """`value`, with the text `true`/`false` (CSV has no boolean type; any case, spaces around) as a bool."""
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    return value


def _ends_in_message(value) -> bool:
    """Whether `value` is a message list whose last entry is a message (a dict)."""
    return isinstance(value, list) and bool(value) and isinstance(value[-1], dict)


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

    def __init__(self, raw: dict, source: str, index: int, base_dir: str | os.PathLike | None = None):
        self.raw, self.source, self.index, self.base_dir = raw, source, index, base_dir
        self.image_parts = False  # whether any message gave a {"type": "image"} content part
        self.given = list(raw) if isinstance(raw, dict) else []  # the columns as the file names them
        self.original = raw  # the row as the file gives it (before data.columns and the forms)
        self.kind = ""  # the data kind being read, for the data.columns a refusal suggests
        self.columns: dict[str, str] = {}  # data.columns in force, which a suggested map extends

    def fail(self, field: str, problem: str) -> DataError:
        return DataError(self.source, problem, row=self.index, field=field)

    def has(self, field: str) -> bool:
        return self.raw.get(field) is not None

    def missing(self, field: str, hint: str = "") -> DataError:
        """A required field the row lacks: the error names the columns it has, the `data.columns` map
        that reads them when they are other projects' names for alignlab's (`suggest_columns`), and the
        forms accepted."""
        forms = "; ".join(ACCEPTED_FORMS)
        return self.fail(
            field, f"missing{hint}; the row has columns {self.given}{self.suggestion()}; accepted forms: {forms}"
        )

    def suggestion(self) -> str:
        """'; ... data.columns={query:prompt,...}' when the row's columns are alignlab's under other names."""
        suggested = suggest_columns(self.original, self.kind, self.raw) if isinstance(self.original, dict) else {}
        if not suggested:
            return ""
        names = ", ".join(f"`{old}` as `{new}`" for old, new in suggested.items())
        return f"; to read {names}, add {columns_override({**self.columns, **suggested})}"  # the whole map to paste

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
            calls = tool_calls_of(m)
            if not isinstance(m, dict) or "role" not in m or ("content" not in m and not calls):
                raise self.fail(field, f"message {i} must be an object with 'role' and 'content'")
            if m["role"] not in ROLES:
                raise self.fail(field, f"message {i} has role {m['role']!r}; expected one of {ROLES}")
            content = "" if m.get("content") is None and calls else m["content"]
            if isinstance(content, list):
                content = "".join(self.parts(field, i, m["role"], content))
            elif not isinstance(content, str):
                raise self.fail(
                    field, f"message {i} content must be text or a list of content parts, got {type(content).__name__}"
                )
            if blank(content) and m["role"] != "system" and not calls:  # an empty system prompt is a choice
                raise self.fail(field, f"message {i} ({m['role']}) is empty; only a system message may be empty")
            out.append(
                {"role": m["role"], "content": content, **self.loss_flag(field, i, m), **self.tool_fields(field, i, m)}
            )
        return out

    def loss_flag(self, field: str, i: int, message: dict) -> dict:
        """{"loss": bool} for an assistant message that says whether it is trained (ms-swift's per-message
        `loss`; a CSV or JSON text `true`/`false` too); {} when it does not say (null: the default rule).

        Raises:
            DataError: a `loss` that is not a boolean, or `loss: true` on a message that is not the
                assistant's (only assistant turns are trained).
        """
        value = _text_bool(message.get("loss"))
        if value is None:
            return {}
        if not isinstance(value, bool):
            raise self.fail(field, f"message {i} has loss {value!r}; expected true, false or null")
        if message["role"] != "assistant":
            if value:
                raise self.fail(
                    field, f"message {i} ({message['role']}) has loss true; only assistant turns are trained"
                )
            return {}
        return {"loss": value} if self.kind == "sft" else {}  # only SFT trains earlier turns

    def raw_list(self, field: str):
        """The file's value of `field`, a `messages` cell's JSON text (CSV) read as its list (valid: the
        row's `messages` were already read from it)."""
        value = self.raw.get(field)
        return json.loads(value) if isinstance(value, str) and field == "messages" else value

    def answer_loss(self, field: str) -> bool | None:
        """The `loss` of the message that holds the answer in `field` (its last message), None when the
        field is text or the message does not say."""
        value = self.raw_list(field)
        if self.kind != "sft" or not _ends_in_message(value):
            return None
        return self.loss_flag(field, len(value) - 1, value[-1]).get("loss")

    def last_trained(self, prompt: list[dict], field: str) -> tuple[list[dict], str | dict]:
        """(prompt, answer) of an SFT conversation whose final answer has `loss: false`: cut after the
        last assistant turn not marked false, which becomes the answer (the turns after it would train
        nothing, and in a causal model change no earlier token's loss).

        Raises:
            DataError: no assistant turn is left to train.
        """
        j = next((j for j in range(len(prompt) - 1, -1, -1) if prompt[j]["role"] == "assistant"), None)
        while j is not None and prompt[j].get("loss") is False:
            j = next((k for k in range(j - 1, -1, -1) if prompt[k]["role"] == "assistant"), None)
        if j is None:
            raise self.fail(
                field,
                "every assistant turn has loss false, so the row trains nothing; mark a turn to train, or leave "
                "the row out",
            )
        kept = prompt[j]
        # An answer that calls tools stays the message (the template writes its calls); `loss` is not kept.
        answer = {k: v for k, v in kept.items() if k != "loss"} if kept.get("tool_calls") else kept["content"]
        return prompt[:j], answer

    def trained_answer(self, field: str) -> None:
        """Refuse `loss: false` on the answer of a pair or a KTO row: those losses always score it (only
        SFT leaves turns untrained). Also checks the flag's type."""
        value = self.raw_list(field)
        if not _ends_in_message(value):
            return
        last = value[-1]
        if _text_bool(last.get("loss")) is False and last.get("role") == "assistant":
            raise self.fail(
                field,
                f"the answer (message {len(value) - 1}) has loss false, but {self.kind} data always trains on its "
                "answers (only SFT leaves turns untrained); remove `loss` or the row",
            )

    def tool_fields(self, field: str, i: int, m: dict) -> dict:
        """What message i keeps besides role and content: an assistant message's `tool_calls` (already
        canonical: alignlab.data.formats.agent_turns), a tool result's `name` and `tool_call_id`."""
        if m["role"] == "assistant" and tool_calls_of(m):
            return {"tool_calls": m["tool_calls"]}
        if m["role"] == "tool":
            out = {}
            for key in ("name", "tool_call_id"):
                if m.get(key) is not None and not isinstance(m[key], str):
                    raise self.fail(field, f"message {i} (tool): {key} must be text, got {type(m[key]).__name__}")
                if m.get(key):
                    out[key] = m[key]
            return out
        return {}

    def parts(self, field: str, i: int, role: str, parts: list) -> list[str]:
        """The texts of message i's content parts (TRL's form), each image part as `<image>`.

        An image part in an assistant message is refused: answers are text; images belong in the prompt.
        """
        texts = []
        for j, part in enumerate(parts):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                texts.append(part["text"])
            elif kind in ("video", "audio", "input_audio"):
                raise self.fail(
                    field, f"message {i} part {j} is a {kind} part; alignlab reads images only, not videos or audio"
                )
            elif kind == "image":
                if role == "assistant":
                    raise self.fail(
                        field, f"message {i} (assistant) has an image part; images belong in prompt messages"
                    )
                self.image_parts = True
                texts.append(IMAGE_PLACEHOLDER)
            else:
                raise self.fail(
                    field,
                    f"message {i} part {j} must be {{'type': 'text', 'text': ...}} or {{'type': 'image'}}, "
                    f"got {describe(part)}",
                )
        return texts

    def prompt(self, field: str = "prompt") -> list[dict]:
        value = self.raw.get(field)
        if isinstance(value, str):
            if blank(value):
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
            raise self.missing(field)
        if isinstance(value, str):
            prefix, text = [], value
        elif not isinstance(value, list):
            raise self.fail(field, f"expected text or a list of messages, got {type(value).__name__}")
        else:
            msgs = self.messages(field, value)
            if msgs[-1]["role"] != "assistant":
                raise self.fail(field, "must end with an assistant message")
            prefix, text = msgs[:-1], reply(msgs[-1])
        if isinstance(text, str) and blank(text):
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
        if isinstance(_text_bool(value), bool):
            return _text_bool(value)  # CSV has no boolean type
        raise self.fail(field, f"expected true or false, got {value!r}" + (self.suggestion() if value is None else ""))

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
        if blank(msgs[-1]["content"]) and not tool_calls_of(msgs[-1]):
            raise self.fail("messages", "the assistant answer is empty")
        return msgs[:-1], reply(msgs[-1])

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
        raise self.missing("prompt", " (give `prompt`, or `messages` in the conversational form)")

    def rejected(self, prompt: list[dict], conversational: bool) -> str:
        """The rejected answer of a pair whose chosen answer follows `prompt`; refused (naming the
        rejected field) when it answers another conversation. `conversational`: the chosen answer ends
        `messages`, and the rejected one is `rejected_response` or (ms-swift) the whole conversation
        `rejected_messages`."""
        if conversational:
            field = "rejected_messages" if self.has("rejected_messages") else "rejected_response"
            name = "`messages`"
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
        """The columns the row carries beyond those read (`used`), for reward functions and evaluation.

        Raises:
            DataError: a `solution` that is an object (a struct column, as verl's `reward_model`): reward
                functions compare it with the answer, so it must be a value (e.g. a struct's field, mapped
                by a dotted data.columns name). A list passes (a custom reward may take several answers).
        """
        out = {k: v for k, v in self.raw.items() if k not in used and k not in IMAGE_COLUMNS}
        solution = out.get("solution")
        if isinstance(solution, dict):
            hint = ""
            if solution:
                column = next((k for k, v in self.original.items() if v is solution), "<column>")
                inner = next((k for k in ("ground_truth", "answer", "solution") if k in solution), list(solution)[-1])
                hint = f"; map the field that holds the answer instead: data.columns={{{column}.{inner}:solution}}"
            raise self.fail(
                "solution",
                f"expected a value (text or a number) to compare answers with, got an object "
                f"{_short(repr(solution), 60)}{hint}",
            )
        return out

    def other_media(self) -> None:
        """Refuse a row that gives videos or audio (`OTHER_MEDIA` columns, or their content parts are
        refused by `parts`): alignlab reads images only, and would train their placeholders as text.
        An empty column (null, [], a blank cell) gives none."""
        for column, medium in OTHER_MEDIA.items():
            value = self.raw.get(column)
            if value is None or value == [] or (isinstance(value, str) and not value.strip()):
                continue
            count = len(value) if isinstance(value, (list, tuple)) else 1
            tag = f"<{medium}>"
            raise self.fail(
                column,
                f"gives {count} {medium}{'s' if count > 1 and medium == 'video' else ''} ({tag} in the messages), "
                f"but alignlab reads images only (`images`, {IMAGE_PLACEHOLDER}); remove the column and its {tag} "
                "placeholders, or leave the row out (data.on_bad_row=skip)",
            )

    def image_values(self, field: str) -> list:
        """The values an image column gives: a list, or one value meaning one image; null, an empty
        list or a blank cell give none; a CSV cell may hold a JSON list."""
        value = self.raw.get(field)
        if isinstance(value, str):
            if not value.strip():
                return []
            if value.lstrip().startswith("["):
                try:  # CSV cells carry lists as JSON text
                    value = json.loads(value)
                except json.JSONDecodeError as e:
                    raise self.fail(field, f"text that starts like a list but is not JSON ({e})") from None
        if value is None:
            return []
        return list(value) if isinstance(value, (list, tuple)) else [value]

    def image(self, field: str, value: Any, what: str) -> Any:
        try:
            return load_image(value, self.base_dir)
        except ImageError as e:
            raise self.fail(field, f"{what}: {e}") from None

    def slots(self, source: str, prompt: list[dict]) -> list[tuple[Any, int]]:
        """Each `<image>` of the prompt messages, in order, as (the image its content part holds
        inline, or `_FROM_COLUMN`; the message's index). The prompt's messages are the first messages
        of `source`, whose raw content parts say which images are inline."""
        raw = self.raw_list(source)
        raw = raw if isinstance(raw, list) else []  # a text prompt has no parts
        out = []
        for i, message in enumerate(prompt):
            content = raw[i]["content"] if i < len(raw) else message["content"]
            parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
            for part in parts:
                if part["type"] == "text":
                    out += [(_FROM_COLUMN, i)] * part["text"].count(IMAGE_PLACEHOLDER)
                else:  # inline as `image` (datasets, TRL), `path` or `url` (transformers' chat format)
                    inline = next((part[k] for k in ("image", "path", "url") if part.get(k) is not None), _FROM_COLUMN)
                    out.append((inline, i))
        return out

    def images(self, source: str, prompt: list[dict], answers: dict[str, str], pairwise: bool = False) -> dict:
        """`images` (and for a pair `rejected_images`) of the canonical row, loaded; {} for a text row.

        A row is a text row (its `<image>` text stays text) without image columns or image parts, or
        when its columns give no image and its prompt holds no placeholder.
        """
        if not (self.image_parts or any(k in self.raw for k in IMAGE_COLUMNS)):
            return {}
        slots = self.slots(source, prompt)
        count = sum(m["content"].count(IMAGE_PLACEHOLDER) for m in prompt)
        column = self.image_values("images")
        inline = sum(value is not _FROM_COLUMN for value, _ in slots)
        if column or inline:
            for field, text in answers.items():
                if IMAGE_PLACEHOLDER in text:
                    raise self.fail(field, f"the answer holds {IMAGE_PLACEHOLDER}; images belong in prompt messages")
        if len(slots) != count or len(column) != len(slots) - inline:
            given = f"{inline + len(column)} images" + (f" ({inline} inline in content parts)" if inline else "")
            given += "" if "images" in self.raw else " (it has no `images` column)"
            raise self.fail(
                "images" if "images" in self.raw else source,
                f"the prompt messages hold {count} {IMAGE_PLACEHOLDER} placeholders but the row gives {given}; "
                f"put one {IMAGE_PLACEHOLDER} (or image part) where each image goes",
            )
        rejected = self.image_values("rejected_images") if pairwise else []
        if len(rejected) not in (0, count):
            raise self.fail(
                "rejected_images",
                f"gives {len(rejected)} images where the prompt holds {count} {IMAGE_PLACEHOLDER} placeholders; "
                "the rejected answer must be about as many images as the chosen one",
            )
        if not count:
            return {}
        column_images = iter(enumerate(column))
        images = []
        for value, i in slots:
            if value is _FROM_COLUMN:
                k, value = next(column_images)
                images.append(self.image("images", value, f"image {k}"))
            else:
                images.append(self.image(source, value, f"the image in message {i}"))
        out = {"images": images}
        if rejected:
            out["rejected_images"] = [self.image("rejected_images", v, f"image {k}") for k, v in enumerate(rejected)]
        return out


def to_canonical(
    raw: dict,
    kind: str,
    source: str,
    index: int,
    base_dir: str | os.PathLike | None = None,
    columns: Mapping[str, str] | None = None,
    converter: Entry | None = None,
) -> dict:
    """Convert one file row to the canonical row of `kind` (see the module docstring), images loaded.

    Args:
        raw: the row as its file gives it, in any form `alignlab.data.formats` recognises.
        kind: one of `KINDS`.
        source, index: the file and 1-based row number that errors name.
        base_dir: the data file's folder, where relative image paths are tried first (then the
            current directory); None: the current directory only.
        columns: `data.columns`, {the file's column name: alignlab's}, applied to the row (as the
            converter returns it).
        converter: `data.row_converter`, the user's function (an entry of
            `alignlab.data.formats.ROW_CONVERTERS`), applied first to the row as the file gives it.

    Raises:
        DataError: naming file, row and field, for a row that cannot be used (images included: a
            missing or unreadable image, a URL, placeholders that do not match the images); with a
            converter, naming `data.row_converter` too (it raised, returned no row, or a row that
            cannot be used).
    """
    if not isinstance(raw, dict):
        raise DataError(source, f"expected an object per row, got {type(raw).__name__}", row=index)
    if converter is None:
        return _read(raw, kind, source, index, base_dir, columns)
    converted = convert_row(raw, converter, source, index)
    try:
        return _read(converted, kind, source, index, base_dir, columns)
    except DataError as e:  # the fields are those of the converter's row: say so
        if e.row != index:
            raise
        problem = str(e).split(": ", 1)[1]
        where = f"in the row data.row_converter {converter.name} returned"
        raise DataError(source, f"({where}) {problem}", row=index, field=e.field) from None


def _read(
    raw: dict,
    kind: str,
    source: str,
    index: int,
    base_dir: str | os.PathLike | None,
    columns: Mapping[str, str] | None,
) -> dict:
    """`to_canonical` of a row (a dict): data.columns, then the recognised forms, then the kind's reader."""
    renamed = rename_columns(raw, columns, source, index)
    read = normalise(renamed, kind, source, index)
    try:
        return _to_canonical(read, kind, source, index, base_dir, raw, columns)
    except DataError as e:  # name the user's column, not the one it was read as
        given = _given_name(e.field, raw, renamed, read, columns)
        if given is None or e.row != index:
            raise
        problem = str(e).split(": ", 1)[1]
        raise DataError(source, f"(read as `{e.field}`) {problem}", row=index, field=given) from None


def _given_name(
    field: str | None, raw: dict, renamed: dict, read: dict, columns: Mapping[str, str] | None
) -> str | None:
    """The file's name of the column an error names as `field`, when the file calls it otherwise: a
    column `data.columns` renamed (a dotted path included), or the column of a recognised form it was
    made from (ShareGPT's `conversations`, Alpaca's `instruction` and `output`, OpenAI's `input`,
    `preferred_output` and `non_preferred_output`, a `messages` prompt); None when the file calls it
    `field`."""
    if field is None or field in raw:
        return None
    if field not in renamed:  # made by a recognised form (alignlab.data.formats)
        consumed = [c for c in renamed if c not in read]  # the columns a form turned into others
        if not isinstance(renamed.get("input"), dict):  # Alpaca's `input` joins the instruction
            consumed = [c for c in consumed if c != "input"]
        made_from = {"messages": "conversations", "completion": "output"}
        made_from |= {"chosen": "preferred_output", "rejected": "non_preferred_output"}
        made_from["prompt"] = next((c for c in ("conversations", "input", "messages") if c in consumed), "instruction")
        field = made_from.get(field)
        if field not in renamed:
            return None
    back = {new: old for old, new in (columns or {}).items() if has_column(raw, old)}
    return back.get(field, field)


def _to_canonical(
    raw: dict,
    kind: str,
    source: str,
    index: int,
    base_dir: str | os.PathLike | None,
    original: dict,
    columns: Mapping[str, str] | None = None,
) -> dict:
    """The canonical row of `kind` from a row in alignlab's columns (`raw`; `original` as the file gave it)."""
    row = _Row(raw, source, index, base_dir)
    row.given, row.original, row.kind, row.columns = list(original), original, kind, dict(columns or {})
    row.other_media()
    if kind not in KIND_READERS:
        raise ValueError(f"unknown data kind {kind!r}; expected one of {KINDS}")
    return KIND_READERS[kind](row)


def _prompt_row(row: _Row) -> dict:
    """A prompt-only row: `messages` (a trailing answer dropped), `prompt`, or a pair's prompt."""
    used = {"messages", "prompt"}
    conversational = row.has("messages")
    if conversational:
        msgs = row.messages("messages")
        while msgs and msgs[-1]["role"] == "assistant":  # a reference answer is not part of the prompt
            msgs = msgs[:-1]
        if not msgs:
            raise row.fail("messages", "has no prompt message before the assistant answer")
        prompt = msgs
    elif row.has("prompt"):
        prompt = row.prompt()
    elif isinstance(row.raw.get("chosen"), list):  # TRL's implicit prompt (or HH): the conversation before the answer
        prompt = row.prompt_and_answer("chosen")[0]
        used |= {"chosen", "rejected"}
    else:
        raise row.missing("messages", " (give `messages` or `prompt`)")
    source_field = "messages" if conversational else "prompt" if row.has("prompt") else "chosen"
    images = row.images(source_field, prompt, {})
    return {"prompt": prompt, **row.extra(used), **images}


def _sft_row(row: _Row) -> dict:
    """An SFT row: a conversation ending in the answer, or a prompt and its `completion` (or `chosen`)."""
    if row.has("messages"):
        field = "messages"
        prompt, completion = row.conversation()
    else:
        field = "completion" if row.has("completion") or not row.has("chosen") else "chosen"
        prompt, completion = row.prompt_and_answer(field)
    if row.answer_loss(field) is False:  # tokens after the last trained turn change no loss: cut there
        prompt, completion = row.last_trained(prompt, field)
    images = row.images(_prompt_source(row, field), prompt, {field: completion})
    used = {"messages", "prompt", "completion", "chosen", "rejected", "rejected_response", "rejected_messages"}
    return {"prompt": prompt, "completion": completion, **row.extra(used), **images}


def _pairwise_row(row: _Row) -> dict:
    """A preference pair: a prompt, its `chosen` and `rejected` answers, numeric columns, images."""
    # UltraFeedback's rows hold `messages` (the chosen conversation) beside `chosen`/`rejected`: a pair
    # given as `chosen` and `rejected` is read from them.
    conversational = row.has("messages") and not (row.has("chosen") and row.has("rejected"))
    field = "messages" if conversational else "chosen"
    prompt, chosen = row.conversation() if conversational else row.prompt_and_answer("chosen")
    answers = {field: chosen}
    if not any(row.has(k) for k in ("rejected", "rejected_response", "rejected_messages")) and row.image_values(
        "rejected_images"
    ):  # ms-swift: `rejected_images` alone is the chosen answer about other images
        rejected, rejected_field = chosen, "rejected_images"
    else:
        rejected = row.rejected(prompt, conversational)
        rejected_field = "rejected" if not conversational else "rejected_messages"
        rejected_field = rejected_field if row.has(rejected_field) else "rejected_response"
        answers[rejected_field] = rejected
    for name in (field, rejected_field):
        row.trained_answer(name)
    images = row.images(_prompt_source(row, field), prompt, answers, pairwise=True)
    if not _distinct_images(images):  # the same pictures: the rejected side is the chosen one's
        images.pop("rejected_images", None)
    if chosen == rejected and "rejected_images" not in images:
        same = " and `rejected_images` are the same images as `images`" if row.image_values("rejected_images") else ""
        raise row.fail(rejected_field, f"identical to the chosen answer{same}, so the pair carries no preference")
    used = {"messages", "prompt", "chosen", "rejected", "rejected_response", "rejected_messages", *NUMERIC_COLUMNS}
    pair = {"prompt": prompt, "chosen": chosen, "rejected": rejected}
    return {**pair, **row.extra(used), **row.numbers(NUMERIC_COLUMNS), **images}


def _labelled_row(row: _Row) -> dict:
    """A KTO row: a prompt, one `completion` and its `label` (read first: a pair fails there, with the hint
    to unpair it)."""
    label = row.label()
    field = "messages" if row.has("messages") else "completion"
    prompt, completion = row.conversation() if field == "messages" else row.prompt_and_answer("completion")
    row.trained_answer(field)
    images = row.images(_prompt_source(row, field), prompt, {field: completion})
    used = {"messages", "prompt", "completion", "label"}
    return {"prompt": prompt, "completion": completion, "label": label, **row.extra(used), **images}


# The reader of each data kind's canonical row, by kind (`KINDS`).
KIND_READERS = {"prompt": _prompt_row, "sft": _sft_row, "pairwise": _pairwise_row, "labelled": _labelled_row}


def _distinct_images(images: dict) -> bool:
    """Whether a pair's `rejected_images` differ from its `images` (in size, mode or any pixel)."""
    rejected = images.get("rejected_images")
    if rejected is None:
        return False
    return any(
        (a.size, a.mode) != (b.size, b.mode) or a.tobytes() != b.tobytes() for a, b in zip(images["images"], rejected)
    )


def _prompt_source(row: _Row, answer_field: str) -> str:
    """The field the prompt messages come from: `messages`, `prompt`, or the answer field that holds
    the whole conversation (TRL's implicit prompt)."""
    if answer_field == "messages" or not row.has("prompt"):
        return answer_field
    return "prompt"


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
    """A canonical pairwise row as two labelled rows: chosen desirable, rejected undesirable. Both
    carry the pair's `images`; the rejected row its `rejected_images` instead when the pair has them."""
    extra = {k: v for k, v in row.items() if k not in ("prompt", "chosen", "rejected", *IMAGE_COLUMNS)}
    images = {"images": row["images"]} if "images" in row else {}
    rejected_images = {"images": row["rejected_images"]} if "rejected_images" in row else images
    return [
        {"prompt": row["prompt"], "completion": row["chosen"], "label": True, **extra, **images},
        {"prompt": row["prompt"], "completion": row["rejected"], "label": False, **extra, **rejected_images},
    ]
