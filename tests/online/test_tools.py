"""Tools: schemas from type hints and docstrings, the two tool-call formats (with malformed calls), and
running calls so that no mistake of the policy or the tool stops a run."""

from __future__ import annotations

import asyncio
import time

import pytest
from transformers.utils import get_json_schema

from alignlab.errors import ConfigError
from alignlab.online.multiturn import ToolEnvironment, environment_factory
from alignlab.online.tools import (
    ToolCall,
    detect_tool_call_format,
    import_object,
    load_tools,
    parse_hermes,
    parse_llama3,
    parse_tool_calls,
    resolve_tool_call_format,
    run_tool_call,
    tool_schema,
)
from alignlab.tools import calculator


def slow_tool(seconds: float) -> str:
    """Sleep, then answer.

    Args:
        seconds: how long to sleep.
    """
    time.sleep(seconds)
    return "done"


async def async_lookup(key: str, seconds: float = 0.0) -> str:
    """An async tool: wait, then answer.

    Args:
        key: what to look up.
        seconds: how long to wait first.
    """
    await asyncio.sleep(seconds)
    return f"value of {key}"


def failing_tool(x: int) -> int:
    """Always fails.

    Args:
        x: anything.
    """
    raise RuntimeError("boom")


def no_docs(x: int) -> int:
    return x


def test_the_calculator_is_exact_and_refuses_what_is_not_arithmetic():
    assert calculator("123456+654321") == "777777"
    assert calculator("999999 + 999999") == "1999998"
    assert calculator("7/2") == "3.5" and calculator("2*(3+4)") == "14" and calculator("-5+2") == "-3"
    for bad in ("__import__('os')", "2**1000", "abc", "1/0", "1+"):
        with pytest.raises(ValueError):
            calculator(bad)


def test_a_schema_comes_from_type_hints_and_the_docstring():
    schema = tool_schema(calculator)
    assert schema["function"]["name"] == "calculator"
    assert schema["function"]["parameters"]["properties"]["expression"]["type"] == "string"
    assert schema["function"]["parameters"]["required"] == ["expression"]


def test_tools_load_by_dotted_path_and_bad_ones_name_the_key():
    assert load_tools(["alignlab.tools.calculator"]) == [calculator]
    with pytest.raises(ConfigError, match=r"algorithm.tools\[1\].*could not be imported"):
        load_tools(["alignlab.tools.calculator", "alignlab.tools.nothing_here"])
    with pytest.raises(ConfigError, match=r"algorithm.tools\[0\].*docstring"):
        load_tools(["tests.online.test_tools.no_docs"])
    with pytest.raises(ConfigError, match="two tools are named"):
        load_tools(["alignlab.tools.calculator", "alignlab.tools.calculator"])


def test_a_tool_or_environment_in_the_users_own_module_that_does_not_import_says_what_is_missing(tmp_path, monkeypatch):
    (tmp_path / "shop_tools_ok.py").write_text(
        'def unit_price(item: str) -> float:\n    """A price.\n\n    Args:\n        item: the item.\n    """\n'
        "    return 0.5\n"
    )
    (tmp_path / "shop_tools_broken.py").write_text("import a_package_nobody_installed\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert load_tools(["shop_tools_ok.unit_price"])[0].__name__ == "unit_price"
    cases = {
        "shop_tools_elsewhere.unit_price": "algorithm.tools[0]: 'shop_tools_elsewhere.unit_price' could not be "
        "imported: there is no module 'shop_tools_elsewhere'; run from the folder that holds shop_tools_elsewhere.py, "
        "or add that folder to PYTHONPATH",
        "shop_tools_ok.unit_pric": "algorithm.tools[0]: 'shop_tools_ok.unit_pric' could not be imported: "
        "'shop_tools_ok' has no 'unit_pric'",
        "shop_tools_broken.unit_price": "algorithm.tools[0]: 'shop_tools_broken.unit_price' could not be imported: "
        "importing 'shop_tools_broken' raised ModuleNotFoundError(\"No module named 'a_package_nobody_installed'\")",
    }
    for path, message in cases.items():
        with pytest.raises(ConfigError) as err:
            load_tools([path])
        assert str(err.value) == message
    with pytest.raises(ConfigError) as err:
        environment_factory("shop_games_elsewhere.Guess", [], None, None)
    assert str(err.value).startswith("algorithm.environment 'shop_games_elsewhere.Guess' could not be imported: there")
    # nested names and packages resolve as Hydra's get_object resolves them
    assert import_object("alignlab.online.multiturn.ToolEnvironment.step", "x") is ToolEnvironment.step
    assert import_object("alignlab.tools.calculator", "x") is calculator


def test_hermes_calls_are_read_in_order_after_text():
    text = (
        'Let me compute.<tool_call>\n{"name": "calculator", "arguments": {"expression": "1+2"}}\n</tool_call>'
        '<tool_call>{"name": "slow_tool", "arguments": "{\\"seconds\\": 0}"}</tool_call>'
    )
    calls = parse_hermes(text)
    assert calls == [ToolCall("calculator", {"expression": "1+2"}), ToolCall("slow_tool", {"seconds": 0})]
    assert parse_hermes("777777") == [] and parse_tool_calls("no call", "hermes") == []


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ('<tool_call>{"name": "calculator", "arguments": {"expression": "1+2"}', "no closing"),
        ('<tool_call>{"name": "calculator", "arguments": {"expression": "1+2"</tool_call>', "not valid JSON"),
        ('<tool_call>{"arguments": {"expression": "1+2"}}</tool_call>', '"name"'),
        ('<tool_call>["calculator"]</tool_call>', '"name"'),
        ('<tool_call>{"name": "calculator", "arguments": [1, 2]}</tool_call>', "must be a JSON object"),
        ("<tool_call></tool_call>", "not valid JSON"),
    ],
)
def test_malformed_hermes_calls_become_errors_not_exceptions(text, problem):
    (call,) = parse_hermes(text)
    assert call.error is not None and problem in call.error


def test_llama3_calls_with_and_without_the_python_tag():
    one = '{"name": "calculator", "parameters": {"expression": "2*3"}}'
    assert parse_llama3(one) == [ToolCall("calculator", {"expression": "2*3"})]
    assert parse_llama3("<|python_tag|>" + one) == parse_llama3(one)
    two = parse_llama3(one + "; " + '{"name": "calculator", "arguments": {"expression": "1"}}')
    assert [c.arguments for c in two] == [{"expression": "2*3"}, {"expression": "1"}]
    assert parse_llama3("The answer is 6.") == []


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ('{"name": "calculator", "parameters": {"expression": "2*3"}', "not valid JSON"),
        ('{"parameters": {"expression": "2*3"}}', '"name"'),
        ('<|python_tag|>{"name": "calculator", "parameters": "2*3"}', "must be a JSON object"),
        ("{not json at all", "not valid JSON"),
    ],
)
def test_malformed_llama3_calls_become_errors_not_exceptions(text, problem):
    (call,) = parse_llama3(text)
    assert call.error is not None and problem in call.error


def test_the_format_is_read_from_the_template_or_the_config():
    assert detect_tool_call_format("{% if tools %}<tool_call>{{ tool }}</tool_call>{% endif %}") == "hermes"
    assert detect_tool_call_format("<|start_header_id|>ipython<|end_header_id|>") == "llama3"
    assert detect_tool_call_format("{{ messages }}") is None
    assert resolve_tool_call_format("llama3", "<tool_call>") == "llama3"
    with pytest.raises(ConfigError, match="algorithm.tool_call_format"):
        resolve_tool_call_format(None, "{{ messages }}")


def test_calls_run_and_every_failure_is_an_error_message_that_counts():
    tools = {"calculator": calculator, "slow_tool": slow_tool, "failing_tool": failing_tool}
    ok = run_tool_call(ToolCall("calculator", {"expression": "123456+654321"}), tools, 5.0)
    assert (ok.content, ok.failed) == ("777777", False)
    assert ok.as_message() == {"role": "tool", "name": "calculator", "content": "777777"}
    failures = {
        "no closing": ToolCall(None, error="the tool call has no closing </tool_call>"),
        "no tool named": ToolCall("search", {"q": "x"}),
        "wrong arguments": ToolCall("calculator", {"expr": "1+1"}),
        "RuntimeError: boom": ToolCall("failing_tool", {"x": 1}),
        "ValueError": ToolCall("calculator", {"expression": "1/0"}),
        "longer than 0.05 s": ToolCall("slow_tool", {"seconds": 1.0}),
    }
    for expected, call in failures.items():
        result = run_tool_call(call, tools, 0.05)
        assert result.failed and result.content.startswith("Error:") and expected in result.content, result


def test_async_tools_are_awaited_and_cancelled_at_the_time_limit():
    tools = {"async_lookup": async_lookup}
    assert get_json_schema(async_lookup)["function"]["parameters"]["required"] == ["key"]
    ok = run_tool_call(ToolCall("async_lookup", {"key": "x"}), tools, 5.0)
    assert (ok.content, ok.failed) == ("value of x", False)
    late = run_tool_call(ToolCall("async_lookup", {"key": "x", "seconds": 5.0}), tools, 0.05)
    assert late.failed and "longer than 0.05 s" in late.content
    wrong = run_tool_call(ToolCall("async_lookup", {"name": "x"}), tools, 5.0)
    assert wrong.failed and "wrong arguments" in wrong.content
