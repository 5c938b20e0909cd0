"""The row forms other trainers and the Hub use, recognised without any option and rewritten into the
columns `alignlab.data.rows.to_canonical` reads (`messages`, `prompt`, `completion`, `chosen`,
`rejected`, `rejected_response`, `label`).

Each recognised form (ShareGPT, Alpaca, Anthropic HH, TRL's implicit prompt, OpenAI preference rows, ...;
last, the tool-call spellings of TRL, ms-swift and LLaMA-Factory) is one converter registered in
`ROW_FORMS`, which `normalise` tries in registration order; each converter's docstring says what it reads,
docs/data.md has one example row of each, and the error for a row in no form lists them from the registry
(`ACCEPTED_FORMS`).
A form of one's own needs no change here: `data.row_converter` names a function that turns each raw row
into one of these forms (`ROW_CONVERTERS`, `convert_row`), applied before anything else.
Everything else (TRL's explicit and conversational forms, ms-swift's `messages` with `rejected_response`
or `rejected_messages`, UltraFeedback's `prompt` with message-list `chosen`/`rejected`) is read by
`to_canonical` directly.

`data.columns` (a map from the file's column names to alignlab's) is applied before any of this; a
name in it may be a dotted path into a struct column (`reward_model.ground_truth`, as verl's rows nest
the answer), which gives the value found there.
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from alignlab.errors import DataError
from alignlab.registry import Entry, Registry

# How ShareGPT's `from` values map to chat roles.
SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "model": "assistant",
    "function_call": "tool_call",  # the assistant's tool call as JSON text: made a `tool_calls` entry (agent_turns)
    "system": "system",
    "observation": "tool",
    "tool": "tool",
}
# Column names other projects use for alignlab's columns, by the data kind that reads them: a row that
# lacks a column alignlab needs but has one of these is told the `data.columns` map that reads it.
SYNONYMS = {
    "prompt": ("query", "question", "instruction", "input", "context", "problem", "request", "user"),
    "completion": ("response", "answer", "output", "target", "reply", "assistant"),
    "chosen": (
        "answer_w",
        "chosen_response",
        "preferred",
        "preferred_output",
        "preferred_response",
        "response_chosen",
        "chosen_answer",
        "response_w",
        "winner",
        "good",
        "positive",
        "accepted",
    ),
    "rejected": (
        "answer_l",
        "rejected_response",
        "non_preferred",
        "non_preferred_output",
        "dispreferred",
        "response_rejected",
        "rejected_answer",
        "response_l",
        "loser",
        "bad",
        "negative",
    ),
    "label": ("kto_tag", "desirable", "is_desirable"),
    "solution": ("answer", "ground_truth", "final_answer", "gold", "target", "reference"),
}
# Which alignlab columns each data kind reads (the targets a suggested map may use).
_KIND_COLUMNS = {
    "sft": ("prompt", "completion"),
    "pairwise": ("prompt", "chosen", "rejected"),
    "labelled": ("prompt", "completion", "label"),
    "prompt": ("prompt", "solution"),
}
_HH_TURN = re.compile(r"(?:^|\n\n)(Human|Assistant):[ \t]?")


def blank(text: str) -> bool:
    """Whether `text` shows nothing: only whitespace and invisible format characters (zero-width space
    and joiners, the byte-order mark, soft hyphen: Unicode category Cf). Every check for an empty
    message, prompt or answer uses this one test, whatever form the row came in."""
    return all(c.isspace() or unicodedata.category(c) == "Cf" for c in text)


_ABSENT = object()


def column_value(raw: dict, name: str):
    """The value of column `name` of a row: the column itself, or, for a dotted path that is not a
    column (`reward_model.ground_truth`), the value found by following it through nested objects
    (struct columns; JSON text of an object, as a CSV cell holds it). `_ABSENT` when there is none."""
    if name in raw:
        return raw[name]
    value = raw
    for key in name.split(".") if "." in name else ():
        if isinstance(value, str) and value.lstrip().startswith("{"):
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                return _ABSENT
        if not isinstance(value, dict) or key not in value:
            return _ABSENT
        value = value[key]
    return _ABSENT if value is raw else value


def has_column(raw: dict, name: str) -> bool:
    """Whether a row gives column `name` (a dotted path: a value inside a struct column, `column_value`)."""
    return column_value(raw, name) is not _ABSENT


def rename_columns(raw: dict, columns: Mapping[str, str] | None, source: str, index: int) -> dict:
    """The row with its columns renamed by `columns` ({file's name: alignlab's name}); a column the
    map does not name keeps its name. A name may be a dotted path into a struct column
    (`column_value`): its value becomes the new column, and the struct column stays as it is.

    Raises:
        DataError: a column would be renamed onto another column the row also has.
    """
    if not columns or not isinstance(raw, dict):
        return raw
    out = {k: v for k, v in raw.items() if k not in columns}
    for old, new in columns.items():
        value = column_value(raw, old)
        if value is _ABSENT:
            continue
        if new in out and new != old.split(".")[0]:  # a struct column may be replaced by its own field
            raise DataError(
                source,
                f"data.columns renames {old!r} to {new!r}, but the row also has a column {new!r}; map only one of them",
                row=index,
                field=old,
            )
        out[new] = value
    return out


def check_mapped_columns(
    rows: Iterable[dict], columns: Mapping[str, str] | None, source: str, key: str = "data.columns"
) -> None:
    """Raise DataError naming the columns of the column map (config key `key`) that no row of the file has."""
    if not columns:
        return
    seen: dict[str, None] = {}
    nested: set[str] = set()  # dotted names some row resolves
    for raw in rows:
        if isinstance(raw, dict):
            seen.update(dict.fromkeys(raw))
            nested.update(k for k in columns if "." in k and k not in raw and column_value(raw, k) is not _ABSENT)
    absent = [k for k in columns if k not in seen and k not in nested]
    if absent:
        raise DataError(
            source,
            f"{key} names {absent} but no row of the file has such a column; its columns are "
            f"{list(seen)}. Fix the names in {key} (keys are the file's names, values alignlab's; a dotted "
            "name such as reward_model.ground_truth reads a field of a struct column)",
        )


def suggest_columns(raw: Mapping, kind: str, present: Iterable[str] = ()) -> dict[str, str]:
    """A `data.columns` map that would read a row's columns as alignlab's for data `kind`: each column
    of `raw` (the row as its file gives it) named as other projects name one of the kind's columns
    (`SYNONYMS`), when neither `raw` nor `present` (the columns read so far) has that column. Columns
    holding null or an object are left out (no synonym is a struct). {} when none applies."""
    have = set(raw) | set(present)
    out: dict[str, str] = {}
    for target in _KIND_COLUMNS.get(kind, ()):
        if target in have:
            continue
        usable = (n for n in SYNONYMS[target] if raw.get(n) is not None and not isinstance(raw[n], dict))
        match = next((n for n in usable if n not in out), None)
        if match is not None:
            out[match] = target
    return out


def columns_override(columns: Mapping[str, str]) -> str:
    """The command-line override that sets `columns` as data.columns: `data.columns={query:prompt,...}`."""
    return "data.columns={" + ",".join(f"{old}:{new}" for old, new in columns.items()) + "}"


def hh_messages(text: str) -> list[dict] | None:
    """An Anthropic HH transcript (`\\n\\nHuman: ...\\n\\nAssistant: ...`) as messages, each content
    stripped; None for text that is not one (it must start with a Human turn and hold an Assistant turn)."""
    if not isinstance(text, str):
        return None
    body = text.lstrip("\n")
    if not body.startswith("Human:") or "\n\nAssistant:" not in body:
        return None
    marks = list(_HH_TURN.finditer(body))
    ends = [m.start() for m in marks[1:]] + [len(body)]
    roles = {"Human": "user", "Assistant": "assistant"}
    return [{"role": roles[m.group(1)], "content": body[m.end() : end].strip()} for m, end in zip(marks, ends)]


def common_prompt(chosen: str, rejected: str) -> tuple[str, str, str]:
    """(prompt, chosen answer, rejected answer) of two texts whose shared beginning is the prompt, cut as
    TRL's `extract_prompt` cuts it: at the first character that differs, a space just before it going
    with the answers."""
    end = 0
    for end in range(min(len(chosen), len(rejected))):
        if chosen[end] != rejected[end]:
            if end and chosen[end - 1] == " ":
                end -= 1
            break
    else:
        end = min(len(chosen), len(rejected))
    return chosen[:end], chosen[end:], rejected[end:]


def _sharegpt_turn(turn, i: int, field: str, source: str, index: int) -> dict:
    if isinstance(turn, dict) and "role" in turn and "content" in turn:
        return turn  # already a message; to_canonical checks it
    if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
        raise DataError(
            source, f"turn {i} must be an object with 'from' and 'value' (ShareGPT)", row=index, field=field
        )
    role = SHAREGPT_ROLES.get(str(turn["from"]).lower())
    if role is None:
        raise DataError(
            source,
            f"turn {i} has from {turn['from']!r}; expected one of {sorted(SHAREGPT_ROLES)}",
            row=index,
            field=field,
        )
    return {"role": role, "content": turn["value"]}


# Message roles other trainers give tool calls and results, read by `agent_turns`: ms-swift's agent rows
# (`tool_call` / `tool_response`) and LLaMA-Factory's ShareGPT `function_call` (mapped to `tool_call`).
CALL_ROLES = ("tool_call", "function_call")
RESULT_ROLES = ("tool_response", "observation")
MESSAGE_FIELDS = ("messages", "prompt", "chosen", "rejected", "rejected_messages")


def without_nulls(value):
    """`value` with every null-valued key of its objects left out, at any depth. Arrow (Parquet files, Hub
    data) gives each object of a column the keys of all rows' objects, null where a row has none, so a
    call's arguments or a tool's schema would show other rows' names; a null argument counts as not given."""
    if isinstance(value, dict):
        return {k: without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [without_nulls(v) for v in value]
    return value


def tool_call(value, where: str, source: str, index: int, field: str) -> dict:
    """One tool call in the canonical (OpenAI / TRL) layout `{"type": "function", "function": {"name": str,
    "arguments": dict}}` (an `id` kept when given; null arguments left out, `without_nulls`), from that
    layout, from `{"function": {...}}`, or from the bare `{"name": ..., "arguments": ...}` ms-swift and
    LLaMA-Factory write (`parameters` as Llama-3 writes it); arguments given as JSON text are parsed, so
    templates write them as JSON (`tojson`).

    Raises:
        DataError: naming file, row and field (`where` says which message) for a call without a name or
            whose arguments are not a JSON object.
    """
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise DataError(source, f"{where}: the tool call is not JSON ({e})", row=index, field=field) from None
    body = value.get("function", value) if isinstance(value, dict) else None
    if not isinstance(body, dict) or not isinstance(body.get("name"), str) or not body["name"].strip():
        raise DataError(
            source,
            f'{where}: a tool call must be an object with a "name" (and "arguments"), got {value!r:.80}',
            row=index,
            field=field,
        )
    arguments = next((body[k] for k in ("arguments", "parameters") if k in body), {})
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError as e:
            raise DataError(
                source, f"{where}: the arguments of {body['name']!r} are not JSON ({e})", row=index, field=field
            ) from None
    if not isinstance(arguments, dict):
        raise DataError(
            source,
            f"{where}: the arguments of {body['name']!r} must be a JSON object, got {type(arguments).__name__}",
            row=index,
            field=field,
        )
    out = {"type": "function", "function": {"name": body["name"], "arguments": without_nulls(arguments)}}
    if isinstance(value, dict) and isinstance(value.get("id"), str):
        out["id"] = value["id"]
    return out


def _with_id(call: dict, i: int, k: int) -> dict:
    """The call with an `id` (kept when given; else one made from message i and call k, nine letters and
    digits as Mistral's template requires): results are paired with calls by it (`tool_call_id`)."""
    return call if "id" in call else {**call, "id": f"c{i:04d}{k:04d}"}


def _call_list(content) -> list:
    """The calls one call message holds: a JSON list of calls (parallel calls, as LLaMA-Factory writes
    them) or one call; text that is not a JSON list stays one call, for `tool_call` to read or refuse."""
    if isinstance(content, str) and content.lstrip().startswith("["):
        try:
            content = json.loads(content)
        except json.JSONDecodeError:
            return [content]
    return content if isinstance(content, list) else [content]


def _message_list(messages, field: str) -> tuple[Any, bool]:
    """`messages` read from JSON text where a CSV cell carries a message list, and whether it is a list
    of messages with a tool call or result in it (anything else `agent_turns` returns as it is)."""
    if isinstance(messages, str) and field == "messages" and messages.lstrip().startswith("["):
        try:
            messages = json.loads(messages)
        except json.JSONDecodeError:
            return messages, False  # to_canonical names the fault
    if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m for m in messages):
        return messages, False
    return messages, any(
        m["role"] in CALL_ROLES + RESULT_ROLES or m.get("tool_calls") or m["role"] == "tool" for m in messages
    )


def _join_calls(out: list[dict], calls: list[dict], m: dict, i: int, source: str, index: int, field: str) -> list:
    """Message i, a call message (CALL_ROLES), as canonical calls on `out`'s last message when that is
    the assistant's with no calls of its own (or only the calls just read, `calls`: parallel calls),
    else on a new assistant message; returns that message's calls, which later results answer."""
    given = _call_list(m.get("content", m.get("value")))
    new = [_with_id(tool_call(c, f"message {i}", source, index, field), i, k) for k, c in enumerate(given)]
    flag = {"loss": m["loss"]} if m.get("loss") is not None else {}  # ms-swift's per-turn `loss` goes along
    last = out[-1] if out else None
    own = last.get("tool_calls") if last is not None else None
    if last is not None and last["role"] == "assistant" and (not own or own is calls):
        last = out[-1] = {**flag, **last, "tool_calls": [*(last.get("tool_calls") or []), *new]}
        last["content"] = last.get("content") or ""
    else:
        out.append({"role": "assistant", "content": "", "tool_calls": new, **flag})
    return out[-1]["tool_calls"]


def _assistant_calls(m: dict, i: int, source: str, index: int, field: str) -> dict:
    """Assistant message i, which has `tool_calls`, with them canonical and `content` "" when it has none."""
    if not isinstance(m["tool_calls"], list):
        raise DataError(source, f"message {i}: tool_calls must be a list of calls", row=index, field=field)
    new = [_with_id(tool_call(c, f"message {i}", source, index, field), i, k) for k, c in enumerate(m["tool_calls"])]
    return {**m, "tool_calls": new, "content": m.get("content") or ""}


def _tool_result(m: dict, calls: list[dict], answered: int) -> dict:
    """A result message as `{"role": "tool", ...}`; when it answers a call (the `answered`-th of the
    last turn's `calls`), named after that call and paired with it by `tool_call_id`, unless it says."""
    m = {**m, "role": "tool"}
    if answered < len(calls):  # the call it answers names it, and gives the id templates pair it by
        if not isinstance(m.get("name"), str):
            m["name"] = calls[answered]["function"]["name"]
        if not m.get("tool_call_id"):
            m["tool_call_id"] = calls[answered]["id"]
    return m


def agent_turns(messages, source: str, index: int, field: str):
    """`messages` with tool calls and results in the canonical form: an assistant message with
    `tool_calls` (canonical entries, `tool_call`) and `content` ("" when it says nothing else), and
    `{"role": "tool", "name": ..., "content": ...}` results. Read from TRL's form (calls on assistant
    messages, arguments as dicts or JSON text), ms-swift's agent rows (a `tool_call` message holding the
    call as JSON text, a `tool_response` message the result) and LLaMA-Factory's ShareGPT
    (`function_call` / `observation`, roles mapped by SHAREGPT_ROLES): consecutive calls are one turn's
    parallel calls, joined to the assistant message just before them when it has none of its own. A
    result without `name` is named after the call it answers (the k-th result after a turn of calls
    answers its k-th call), and gets its `tool_call_id`; a call without `id` gets one (`_with_id`).
    Anything that is not a list of messages is returned as it is.

    Raises:
        DataError: naming file, row and field, for a call that cannot be read (see `tool_call`) or
            `tool_calls` on a message that is not the assistant's.
    """
    messages, agent = _message_list(messages, field)
    if not agent:
        return messages
    out: list[dict] = []
    calls: list[dict] = []  # the calls of the last assistant turn, which later results answer in order
    answered = 0
    for i, m in enumerate(messages):
        role = m["role"]
        if role in CALL_ROLES:
            calls, answered = _join_calls(out, calls, m, i, source, index, field), 0
            continue
        if m.get("tool_calls") and role != "assistant":
            problem = f"message {i} ({role}) has tool_calls; only assistant messages call tools"
            raise DataError(source, problem, row=index, field=field)
        if role == "assistant" and m.get("tool_calls"):
            m = _assistant_calls(m, i, source, index, field)
            calls, answered = m["tool_calls"], 0
        elif role in RESULT_ROLES or role == "tool":
            m, answered = _tool_result(m, calls, answered), answered + 1
        else:
            calls, answered = [], 0
        out.append(m)
    return out


# -- the recognised row forms, one converter each ----------------------------------------------------------
# The forms other trainers and the Hub write, in the order `normalise` tries them on a row (each seeing the
# row as the forms before it left it): a converter `fn(raw, kind, source, index) -> row` registered with
# `detect(raw, kind)`, whether a row is in its form, and `described`, how the error for a row in no form
# lists it ("" for a spelling inside other forms). A new form is one decorated function here.
ROW_FORMS: Registry[Callable[..., dict]] = Registry("row form", None, detect=None, described="")
# The forms `to_canonical` reads directly, listed first by the error for a row in no form.
CANONICAL_FORMS = (
    "`messages` (+ `rejected_response` or `rejected_messages` for a pair, + `label` for KTO)",
    "`prompt` (or a `messages` prompt) + `completion` / `chosen` + `rejected` (text or message lists; + `label` "
    "for KTO)",
)
# A user's own converter, `data.row_converter`: `fn(row) -> row` by dotted path or {_target_: path, **kwargs}.
ROW_CONVERTERS: Registry[Callable[[dict], dict]] = Registry("row converter", "data.row_converter")


def _given(raw: dict, *keys: str) -> bool:
    """Whether the row gives any of `keys` a value (null counts as not given)."""
    return any(raw.get(k) is not None for k in keys)


@ROW_FORMS.register(
    "openai_preference",
    detect=lambda raw, kind: (
        isinstance(raw.get("input"), dict) and any(k in raw for k in ("preferred_output", "non_preferred_output"))
    ),
    described="`input.messages` + `preferred_output` + `non_preferred_output` (OpenAI preference fine-tuning)",
)
def openai_preference(raw: dict, kind: str, source: str, index: int) -> dict:
    """OpenAI's preference fine-tuning row: `input.messages` is the prompt (`input.tools` the row's tools;
    `parallel_tool_calls` is OpenAI's API switch, not data), `preferred_output` / `non_preferred_output`
    the chosen and rejected answers."""
    given = raw["input"]
    if not isinstance(given.get("messages"), list):
        raise DataError(
            source,
            "expected an object with `messages` (OpenAI's preference form: input.messages, preferred_output, "
            "non_preferred_output)",
            row=index,
            field="input",
        )
    out = {k: v for k, v in raw.items() if k not in ("input", "preferred_output", "non_preferred_output")}
    out["prompt"] = given["messages"]
    for name, field in (("preferred_output", "chosen"), ("non_preferred_output", "rejected")):
        if raw.get(name) is not None:
            out[field] = raw[name]
    if given.get("tools") and "tools" not in out:
        out["tools"] = given["tools"]
    return out


@ROW_FORMS.register("tools_text", detect=lambda raw, kind: "tools" in raw)
def tools_text(raw: dict, kind: str, source: str, index: int) -> dict:
    """`tools` as a list of JSON-schema objects (a JSON string, as ms-swift and CSV store it, is parsed);
    null or an empty list: no tools."""
    value = raw["tools"]
    if isinstance(value, str):
        if not value.strip():
            value = None
        else:
            try:
                value = json.loads(value)
            except json.JSONDecodeError as e:
                raise DataError(source, f"text that is not JSON ({e})", row=index, field="tools") from None
    out = {k: v for k, v in raw.items() if k != "tools"}
    if value is None or value == []:
        return out
    if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
        raise DataError(
            source,
            "expected a list of tool schemas (JSON objects), as chat templates take them",
            row=index,
            field="tools",
        )
    out["tools"] = without_nulls(value)
    return out


@ROW_FORMS.register(
    "messages_prompt",
    detect=lambda raw, kind: (
        raw.get("messages") is not None
        and raw.get("prompt") is None
        and _given(raw, "chosen", "rejected", "completion")
    ),
)
def messages_prompt(raw: dict, kind: str, source: str, index: int) -> dict:
    """A row whose `messages` end in a user (or tool) turn and that gives its answers in `chosen`,
    `rejected` or `completion`, without `prompt`: `messages` is the prompt (a JSON text cell is read)."""
    messages = raw["messages"]
    if isinstance(messages, str):
        try:  # CSV cells carry message lists as JSON text
            messages = json.loads(messages)
        except json.JSONDecodeError:
            return raw  # to_canonical names the cell that is not JSON
    if not isinstance(messages, list) or not messages or not isinstance(messages[-1], dict):
        return raw
    if messages[-1].get("role") == "assistant":  # a whole conversation (UltraFeedback's), read as before
        return raw
    return {**{k: v for k, v in raw.items() if k != "messages"}, "prompt": messages}


@ROW_FORMS.register(
    "sharegpt",
    detect=lambda raw, kind: raw.get("conversations") is not None and not _given(raw, "messages", "prompt"),
    described="`conversations` of from/value turns (ShareGPT)",
)
def sharegpt(raw: dict, kind: str, source: str, index: int) -> dict:
    """ShareGPT (LLaMA-Factory's `sharegpt` formatting): `conversations` of from/value turns are `messages`,
    or a pair's prompt when it gives `chosen`/`rejected` turns; `system` opens it; `kto_tag` is the label."""
    turns = raw["conversations"]
    if not isinstance(turns, list) or not turns:
        raise DataError(source, "expected a non-empty list of turns", row=index, field="conversations")
    messages = [_sharegpt_turn(t, i, "conversations", source, index) for i, t in enumerate(turns)]
    system = raw.get("system")
    if isinstance(system, str) and system.strip() and not any(m["role"] == "system" for m in messages):
        messages.insert(0, {"role": "system", "content": system})
    out = {k: v for k, v in raw.items() if k not in ("conversations", "system")}
    if "chosen" in raw or "rejected" in raw:  # a preference pair: the conversation is the prompt
        for field in ("chosen", "rejected"):
            value = raw.get(field)
            if isinstance(value, dict):
                value = [value]
            if isinstance(value, list):
                out[field] = [_sharegpt_turn(t, i, field, source, index) for i, t in enumerate(value)]
        out["prompt"] = messages
    else:
        out["messages"] = messages
    if "label" not in out and isinstance(raw.get("kto_tag"), bool):  # LLaMA-Factory's KTO label
        out["label"] = out.pop("kto_tag")
    return out


@ROW_FORMS.register(
    "alpaca",
    detect=lambda raw, kind: raw.get("instruction") is not None and not _given(raw, "messages", "prompt"),
    described="`instruction` + `input` + `output` (Alpaca)",
)
def alpaca(raw: dict, kind: str, source: str, index: int) -> dict:
    """Alpaca (LLaMA-Factory's `alpaca` formatting): `instruction` and `input` are the question, `output`
    the answer; `system` and `history` ([[question, answer], ...]) come before it."""
    instruction, extra = raw["instruction"], raw.get("input")
    if not isinstance(instruction, str):
        raise DataError(source, f"expected text, got {type(instruction).__name__}", row=index, field="instruction")
    if extra is not None and not isinstance(extra, str):
        raise DataError(source, f"expected text, got {type(extra).__name__}", row=index, field="input")
    # the non-blank of instruction and input, joined by a newline (as ms-swift and LLaMA-Factory join them)
    question = "\n".join(part for part in (instruction, extra) if part and not blank(part))
    messages = []
    if isinstance(raw.get("system"), str) and raw["system"].strip():
        messages.append({"role": "system", "content": raw["system"]})
    history = raw.get("history") or []
    if not isinstance(history, list) or not all(isinstance(t, (list, tuple)) and len(t) == 2 for t in history):
        raise DataError(source, "expected a list of [question, answer] pairs", row=index, field="history")
    for q, a in history:
        messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    out = {k: v for k, v in raw.items() if k not in ("instruction", "input", "output", "system", "history")}
    out["prompt"] = messages + [{"role": "user", "content": question}] if messages else question
    if raw.get("output") is not None:
        out["completion"] = raw["output"]
    return out


def _transcripts(raw: dict) -> tuple[list | None, list | None]:
    return hh_messages(raw.get("chosen")), hh_messages(raw.get("rejected"))


@ROW_FORMS.register(
    "hh",
    detect=lambda raw, kind: (
        raw.get("messages") is None
        and (hh := _transcripts(raw))[0] is not None
        and (hh[1] is not None or raw.get("rejected") is None)
    ),
    described="`chosen` + `rejected` transcripts of Human:/Assistant: turns (Anthropic HH)",
)
def hh(raw: dict, kind: str, source: str, index: int) -> dict:
    """Anthropic HH: `chosen`/`rejected` whole transcripts, read as message lists (`hh_messages`)."""
    chosen, rejected = _transcripts(raw)
    return {**raw, "chosen": chosen, **({"rejected": rejected} if rejected is not None else {})}


@ROW_FORMS.register(
    "implicit_prompt",
    detect=lambda raw, kind: (
        not _given(raw, "messages", "prompt")
        and isinstance(raw.get("chosen"), str)
        and isinstance(raw.get("rejected"), str)
        and raw["chosen"] != raw["rejected"]
        and kind in ("pairwise", "labelled", "prompt", "sft")
    ),
    described="`chosen` + `rejected` alone (TRL's implicit prompt)",
)
def implicit_prompt(raw: dict, kind: str, source: str, index: int) -> dict:
    """TRL's standard form with an implicit prompt: the texts' common beginning (`common_prompt`); with none,
    `prompt` stays missing and the row is refused for it."""
    prompt, chosen, rejected = common_prompt(raw["chosen"], raw["rejected"])
    return raw if blank(prompt) else {**raw, "prompt": prompt, "chosen": chosen, "rejected": rejected}


@ROW_FORMS.register(
    "hh_prompt",
    detect=lambda raw, kind: (
        raw.get("messages") is None and isinstance(raw.get("prompt"), str) and bool(hh_messages(raw["prompt"]))
    ),
)
def hh_prompt(raw: dict, kind: str, source: str, index: int) -> dict:
    """An HH transcript as an explicit `prompt` (its trailing empty assistant turn dropped)."""
    messages = hh_messages(raw["prompt"])
    if messages[-1]["role"] == "assistant" and not messages[-1]["content"]:
        messages = messages[:-1]  # HH prompts end with the assistant's empty turn
    return {**raw, "prompt": messages}


@ROW_FORMS.register("tool_calls", detect=lambda raw, kind: any(f in raw for f in MESSAGE_FIELDS))
def tool_calls(raw: dict, kind: str, source: str, index: int) -> dict:
    """Every message list's tool calls and results in the canonical spelling (`agent_turns`)."""
    for field in MESSAGE_FIELDS:
        if field in raw:
            turns = agent_turns(raw[field], source, index, field)
            if turns is not raw[field]:
                raw = {**raw, field: turns}
    return raw


# The forms a row may take, as the error for a row matching none of them lists them.
ACCEPTED_FORMS = CANONICAL_FORMS + tuple(ROW_FORMS[n].described for n in ROW_FORMS if ROW_FORMS[n].described)


def normalise(raw: dict, kind: str, source: str, index: int) -> dict:
    """The row rewritten into alignlab's columns by each recognised form (`ROW_FORMS`, in its order) whose
    `detect` matches it; any other row unchanged.

    Raises:
        DataError: naming file, row and field, for a recognised form with a malformed value.
    """
    if not isinstance(raw, dict):
        return raw
    for name in ROW_FORMS:
        form = ROW_FORMS[name]
        if form.detect(raw, kind):
            raw = form.fn(raw, kind, source, index)
    return raw


def convert_row(raw: dict, converter: Entry, source: str, index: int | None) -> dict:
    """The row the user's `data.row_converter` (resolved by `ROW_CONVERTERS`) makes of a file's row (a copy).

    Raises:
        DataError: naming file, row and `data.row_converter`, when the function raises or returns
            anything but a row (a dict of columns).
    """
    try:
        out = converter.fn(dict(raw))
    except Exception as e:
        raise DataError(source, f"data.row_converter {converter.name} raised {e!r}", row=index) from e
    if not isinstance(out, dict):
        raise DataError(
            source,
            f"data.row_converter {converter.name} returned {type(out).__name__}, not a row (a dict of columns)",
            row=index,
        )
    return out
