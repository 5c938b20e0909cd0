"""Tools a policy calls during a multi-turn rollout: loading them from config, their JSON schemas,
parsing tool calls out of a completion, and running them with a time limit.

A tool is a plain Python function with type hints and a Google-style docstring, named by dotted path
in `algorithm.tools`; transformers' `get_json_schema` turns it into the schema that the chat template's
`tools` argument takes, so each model family lists tools (and expects calls) in its own format, as in
TRL's `tools` and ms-swift's agent templates. Two call formats are parsed:

- `hermes` (Hermes, Qwen2.5/Qwen3, many others): `<tool_call>{"name": …, "arguments": {…}}</tool_call>`,
  one block per call, possibly after some text.
- `llama3` (Llama-3.1/3.2/3.3 JSON tool calling): the whole answer is `{"name": …, "parameters": {…}}`
  (or `"arguments"`), optionally after `<|python_tag|>`; several calls separated by `;`.

A call that cannot be read (bad JSON, no name, an unknown tool, wrong arguments) or a tool that raises
or runs past its time limit never stops the run: its result is an error message that the model reads
as the tool's answer, and it is counted (`tools/failure_frequency`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from alignlab.errors import ConfigError
from alignlab.online.rewards import is_async
from alignlab.registry import import_object

TOOL_CALL_FORMATS = ("hermes", "llama3")


# -- loading ------------------------------------------------------------------------------------
def load_tool(path: str, key: str = "algorithm.tools") -> Callable:
    """The function at dotted `path` (`package.module.function`), checked to make a JSON schema.

    Raises:
        ConfigError: naming `key` when it does not import, is not callable, or lacks the type hints
        and docstring `get_json_schema` needs.
    """
    if not isinstance(path, str) or "." not in path:
        raise ConfigError(f"{key}: expected a dotted path such as alignlab.tools.calculator, got {path!r}")
    fn = import_object(path, f"{key}: {path!r}")
    if not callable(fn):
        raise ConfigError(f"{key}: {path!r} is not a function")
    tool_schema(fn, key=f"{key} ({path})")
    return fn


def load_tools(paths: Sequence[str] | None, key: str = "algorithm.tools") -> list[Callable]:
    """Every tool in `paths` (load_tool), refusing two with one name (a call names its tool).

    Raises:
        ConfigError: naming `key[i]`.
    """
    tools = [load_tool(p, f"{key}[{i}]") for i, p in enumerate(paths or [])]
    names = [t.__name__ for t in tools]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ConfigError(f"{key}: two tools are named {twice}; a tool call names its tool, so names must differ")
    return tools


def tool_schema(fn: Callable, key: str = "algorithm.tools") -> dict:
    """The JSON schema of `fn` (transformers' `get_json_schema`: name, description, parameters).

    Raises:
        ConfigError: naming `key` when a parameter lacks a type hint or the docstring its description.
    """
    from transformers.utils import get_json_schema

    try:
        return get_json_schema(fn)
    except Exception as e:
        raise ConfigError(
            f"{key}: {getattr(fn, '__name__', fn)!r} cannot be described to the model: {e}. A tool needs a type "
            "hint on every parameter and a docstring with an `Args:` line per parameter (docs/tools.md)"
        ) from None


# -- the call format ------------------------------------------------------------------------------
def detect_tool_call_format(chat_template: str | None) -> str | None:
    """`hermes` when the template writes `<tool_call>`, `llama3` when it writes Llama-3's `<|python_tag|>`
    or its `ipython` role; None when neither (set `algorithm.tool_call_format`)."""
    template = chat_template or ""
    if "<tool_call>" in template:
        return "hermes"
    if "<|python_tag|>" in template or "ipython" in template:
        return "llama3"
    return None


def resolve_tool_call_format(configured: str | None, chat_template: str | None) -> str:
    """`configured` (algorithm.tool_call_format) if set, else the format the template writes.

    Raises:
        ConfigError: when neither names one.
    """
    if configured is not None:
        return configured
    found = detect_tool_call_format(chat_template)
    if found is None:
        raise ConfigError(
            "algorithm.tool_call_format is null and the chat template shows no tool-call format (no `<tool_call>`, "
            f"no `<|python_tag|>`): set algorithm.tool_call_format to one of {TOOL_CALL_FORMATS}"
        )
    return found


# -- parsing ------------------------------------------------------------------------------------
@dataclass
class ToolCall:
    """One call read from a completion: the tool's `name` and its `arguments`, or, when it could not be
    read, `error` (what was wrong, in words the model reads back)."""

    name: str | None
    arguments: dict = field(default_factory=dict)
    error: str | None = None


def _from_json(text: str, argument_keys: tuple[str, ...]) -> ToolCall:
    try:
        call = json.loads(text)
    except json.JSONDecodeError as e:
        return ToolCall(None, error=f"the tool call is not valid JSON ({e.msg} at character {e.pos})")
    if not isinstance(call, dict) or not isinstance(call.get("name"), str):
        return ToolCall(None, error='a tool call must be a JSON object with a "name"')
    arguments = next((call[k] for k in argument_keys if k in call), {})
    if isinstance(arguments, str):  # some models write the arguments as a JSON string
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            pass
    if not isinstance(arguments, dict):
        return ToolCall(call["name"], error=f'the "{argument_keys[0]}" of a tool call must be a JSON object')
    return ToolCall(call["name"], arguments)


_HERMES_BLOCK = re.compile(r"<tool_call>(.*?)(</tool_call>|$)", re.DOTALL)


def parse_hermes(text: str) -> list[ToolCall]:
    """Every `<tool_call>{json}</tool_call>` block in `text`, in order ([] when there is none). A block
    without its closing tag, or whose JSON is bad or lacks `name`, gives a ToolCall with `error`."""
    calls = []
    for match in _HERMES_BLOCK.finditer(text):
        body, closed = match.group(1).strip(), bool(match.group(2))
        if not closed:
            calls.append(ToolCall(None, error="the tool call has no closing </tool_call>"))
            continue
        calls.append(_from_json(body, ("arguments", "parameters")))
    return calls


def parse_llama3(text: str) -> list[ToolCall]:
    """Llama-3.x JSON tool calls: the answer (after an optional `<|python_tag|>`) is one JSON object
    `{"name": …, "parameters": {…}}` or several separated by `;`. An answer that does not start with
    `{` is plain text ([]); one that does but cannot be read gives a ToolCall with `error`."""
    body = text.strip().removeprefix("<|python_tag|>").strip()
    if not body.startswith("{"):
        return []
    try:
        return [_from_json(json.dumps(json.loads(body)), ("parameters", "arguments"))]
    except json.JSONDecodeError:
        pass
    parts = [p.strip() for p in body.split(";") if p.strip()]
    return [_from_json(p, ("parameters", "arguments")) for p in parts]


PARSERS: dict[str, Callable[[str], list[ToolCall]]] = {"hermes": parse_hermes, "llama3": parse_llama3}


def parse_tool_calls(text: str, tool_call_format: str) -> list[ToolCall]:
    """The tool calls in a completion's `text`, read in `tool_call_format` (TOOL_CALL_FORMATS)."""
    return PARSERS[tool_call_format](text)


# -- running ------------------------------------------------------------------------------------
@dataclass
class ToolResult:
    """What a call gave: `content` (the tool's result as text, or an error message) and whether it failed."""

    name: str
    content: str
    failed: bool

    def as_message(self) -> dict:
        return {"role": "tool", "name": self.name, "content": self.content}


_POOL: concurrent.futures.ThreadPoolExecutor | None = None


def _pool() -> concurrent.futures.ThreadPoolExecutor:
    global _POOL
    if _POOL is None:
        _POOL = concurrent.futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="alignlab-tool")
    return _POOL


def _as_text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, default=str)


def run_tool_call(call: ToolCall, tools: dict[str, Callable], timeout: float | None) -> ToolResult:
    """Run one parsed call against `tools` ({name: function}) for at most `timeout` seconds (None: no
    limit). Never raises for the policy's mistakes or the tool's failures: an unreadable call, an unknown
    tool, arguments the function does not take, an exception or a timeout give `failed` and an error
    message as content. An `async def` tool (as TRL runs them) is awaited in a worker thread's own event
    loop and cancelled at the time limit. A synchronous tool past its limit keeps running in its worker
    thread (Python cannot stop a thread), its result ignored: a tool that may hang should limit itself too."""
    name = call.name or "unknown"
    if call.error is not None:
        return ToolResult(name, f"Error: {call.error}", True)
    fn = tools.get(call.name)
    if fn is None:
        return ToolResult(name, f"Error: there is no tool named {call.name!r}; the tools are {sorted(tools)}", True)
    try:
        inspect.signature(fn).bind(**call.arguments)
    except TypeError as e:
        return ToolResult(name, f"Error: wrong arguments for {call.name}: {e}", True)
    if is_async(fn):
        future = _pool().submit(asyncio.run, asyncio.wait_for(fn(**call.arguments), timeout))
    else:
        future = _pool().submit(fn, **call.arguments)
    try:
        value = future.result(timeout=timeout)
    except (concurrent.futures.TimeoutError, asyncio.TimeoutError):
        return ToolResult(name, f"Error: {call.name} took longer than {timeout} s", True)
    except Exception as e:
        return ToolResult(name, f"Error: {type(e).__name__}: {e}", True)
    return ToolResult(name, _as_text(value), False)
