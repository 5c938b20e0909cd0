"""Tool-calling rows (issue 32, items 1 and 2): TRL's `tool_calls`, ms-swift's agent rows and LLaMA-Factory's
ShareGPT `function_call` / `observation` turns read into one canonical form in every reading path; the
chat template writes the calls, which are trained, and the results, which are not; what is trained parses
back through the GRPO call parsers; a row's own `tools` reach GRPO episodes by a stated rule."""

from __future__ import annotations

import copy
import json
import logging
import re
from pathlib import Path

import pandas as pd
import pytest

from alignlab.data import SFTDataModule
from alignlab.data.files import FileSource
from alignlab.data.mixture import MixtureSource
from alignlab.data.rows import to_canonical
from alignlab.data.tokenize import TemplateRefusal, encode_turns, template_writes_tools
from alignlab.errors import ConfigError, DataError
from alignlab.online.multiturn import EpisodeSetup, episode_schemas, open_episodes, render_prompt
from alignlab.online.tools import parse_hermes, parse_llama3
from tests.data.folders import write_jsonl

TOKENIZERS = Path(__file__).resolve().parents[3] / "shared" / "tokenizers"
ARGS = {"expression": "2+3", "exact": True}
SCHEMA = {
    "type": "function",
    "function": {
        "name": "calc",
        "description": "Evaluate an expression.",
        "parameters": {"type": "object", "properties": {"expression": {"type": "string"}}},
    },
}
SWIFT_CALL = json.dumps({"name": "calc", "arguments": ARGS})
# One conversation (a call, its result, the final answer) in each project's spelling.
FORMS = {
    "TRL": {
        "messages": [
            {"role": "user", "content": "2+3?"},
            {
                "role": "assistant",
                "tool_calls": [{"type": "function", "function": {"name": "calc", "arguments": ARGS}}],
            },
            {"role": "tool", "name": "calc", "content": "5"},
            {"role": "assistant", "content": "It is 5."},
        ],
        "tools": [SCHEMA],
    },
    "TRL, arguments as JSON text": {
        "messages": [
            {"role": "user", "content": "2+3?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [{"type": "function", "function": {"name": "calc", "arguments": json.dumps(ARGS)}}],
            },
            {"role": "tool", "content": "5"},
            {"role": "assistant", "content": "It is 5."},
        ],
        "tools": [SCHEMA],
    },
    "ms-swift agent": {
        "messages": [
            {"role": "user", "content": "2+3?"},
            {"role": "tool_call", "content": SWIFT_CALL},
            {"role": "tool_response", "content": "5"},
            {"role": "assistant", "content": "It is 5."},
        ],
        "tools": json.dumps([SCHEMA]),
    },
    "LLaMA-Factory ShareGPT": {
        "conversations": [
            {"from": "human", "value": "2+3?"},
            {"from": "function_call", "value": SWIFT_CALL},
            {"from": "observation", "value": "5"},
            {"from": "gpt", "value": "It is 5."},
        ],
        "tools": json.dumps([SCHEMA]),
    },
}
CANONICAL_PROMPT = [
    {"role": "user", "content": "2+3?"},
    {
        "role": "assistant",
        "content": "",
        "tool_calls": [{"type": "function", "function": {"name": "calc", "arguments": ARGS}, "id": "c00010000"}],
    },
    {"role": "tool", "content": "5", "name": "calc", "tool_call_id": "c00010000"},
]
# Qwen2.5's tool layout (system <tools> list, <tool_call> blocks, <tool_response> in a user turn), as its
# template writes them; the real file is not among ../shared/tokenizers.
QWEN25_TOOLS = (
    "{%- if tools %}{{- '<|im_start|>system\\n# Tools\\n<tools>' }}{%- for tool in tools %}{{- '\\n' }}"
    "{{- tool | tojson }}{%- endfor %}{{- '\\n</tools><|im_end|>\\n' }}{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role in ('user', 'system') or (message.role == 'assistant' and not message.tool_calls) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- elif message.role == 'assistant' %}{{- '<|im_start|>' + message.role }}"
    "{%- if message.content %}{{- '\\n' + message.content }}{%- endif %}"
    "{%- for tool_call in message.tool_calls %}{%- if tool_call.function is defined %}"
    "{%- set tool_call = tool_call.function %}{%- endif %}"
    '{{- \'\\n<tool_call>\\n{"name": "\' }}{{- tool_call.name }}{{- \'", "arguments": \' }}'
    "{{- tool_call.arguments | tojson }}{{- '}\\n</tool_call>' }}{%- endfor %}{{- '<|im_end|>\\n' }}"
    "{%- elif message.role == 'tool' %}"
    "{%- if loop.index0 == 0 or messages[loop.index0 - 1].role != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}"
    "{{- '\\n<tool_response>\\n' + message.content + '\\n</tool_response>' }}"
    "{%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}{{- '<|im_end|>\\n' }}{%- endif %}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def real_template(name: str) -> str:
    path = TOKENIZERS / name / "tokenizer_config.json"
    if not path.exists():
        pytest.skip(f"{path} is not on this machine")
    return json.loads(path.read_text())["chat_template"]


@pytest.fixture
def templates(tiny):
    """name → (tokenizer, the parser of its call format or None): the tiny ChatML one (writes no calls:
    Hermes blocks), Qwen2.5's tool layout, the real Llama-3.1 template on the tiny llama3 family tokenizer."""
    from tests.families import build_tokenizer

    out = {"tiny ChatML": (tiny[1], parse_hermes)}
    qwen = copy.deepcopy(tiny[1])
    qwen.chat_template = QWEN25_TOOLS
    out["Qwen2.5 tools"] = (qwen, parse_hermes)
    if (TOKENIZERS / "llama31").exists():
        llama = build_tokenizer("llama3")
        llama.chat_template = real_template("llama31")
        out["Llama-3.1 (real template)"] = (llama, parse_llama3)
    return out


@pytest.mark.parametrize("form", list(FORMS))
def test_each_spelling_reads_into_the_one_canonical_form(form):
    row = to_canonical(FORMS[form], "sft", "f.jsonl", 1)
    assert row == {"prompt": CANONICAL_PROMPT, "completion": "It is 5.", "tools": [SCHEMA]}


def test_content_beside_tool_calls_is_kept_and_an_answer_that_calls_is_a_message():
    call = {"type": "function", "function": {"name": "calc", "arguments": ARGS}}
    messages = [
        {"role": "user", "content": "2+3?"},
        {"role": "assistant", "content": "Let me see.", "tool_calls": [call]},
    ]
    row = to_canonical({"messages": messages}, "sft", "f.jsonl", 1)
    assert row["completion"] == {
        "role": "assistant",
        "content": "Let me see.",
        "tool_calls": [{**call, "id": "c00010000"}],
    }
    # LLaMA-Factory: parallel calls as one JSON list
    listed = [messages[0], {"role": "function_call", "content": json.dumps([json.loads(SWIFT_CALL)] * 2)}]
    assert len(to_canonical({"messages": listed}, "sft", "f.jsonl", 1)["completion"]["tool_calls"]) == 2
    # ms-swift: text, then two parallel calls, join into one assistant turn
    swift = [
        messages[0],
        {"role": "assistant", "content": "Let me see."},
        *[{"role": "tool_call", "content": SWIFT_CALL}] * 2,
    ]
    row = to_canonical({"messages": swift}, "sft", "f.jsonl", 1)
    assert row["completion"]["content"] == "Let me see." and len(row["completion"]["tool_calls"]) == 2


BAD = [
    ("no name", {"role": "tool_call", "content": json.dumps({"arguments": {}})}, 'must be an object with a "name"'),
    ("arguments not JSON", {"role": "tool_call", "content": '{"name": "calc", "arguments": "{x"}'}, "are not JSON"),
    ("arguments a list", {"role": "tool_call", "content": '{"name": "calc", "arguments": [1]}'}, "JSON object"),
    ("call not JSON", {"role": "tool_call", "content": "calc(2+3)"}, "the tool call is not JSON"),
    ("calls list not JSON", {"role": "tool_call", "content": '[{"name": "calc"'}, "the tool call is not JSON"),
    ("calls on a user message", {"role": "user", "content": "x", "tool_calls": [{"name": "calc"}]}, "only assistant"),
]


@pytest.mark.parametrize(("case", "message", "problem"), BAD, ids=[b[0] for b in BAD])
def test_a_call_that_cannot_be_read_is_refused_naming_file_row_field_and_message(tmp_path, case, message, problem):
    good = FORMS["TRL"]
    bad = {"messages": [{"role": "user", "content": "2+3?"}, message, {"role": "assistant", "content": "5"}]}
    path = write_jsonl(tmp_path / "calls.jsonl", [good, bad])
    with pytest.raises(DataError) as err:
        FileSource(str(path)).load("sft")
    assert str(err.value).startswith(f"{path}, row 2, field 'messages': message 1") and problem in str(err.value)


def reading_paths(tmp_path: Path, rows: list[dict], csv: bool) -> dict:
    """The same rows as JSON lines, a JSON document, Parquet (nested columns, as `datasets` writes them), a
    Hub-shaped folder, a stream, a mixture and (`csv`: message lists as JSON text) CSV."""
    (tmp_path / "rows.json").write_text(json.dumps(rows))
    write_jsonl(tmp_path / "rows.jsonl", rows)
    pd.DataFrame(rows).to_parquet(tmp_path / "rows.parquet")
    (tmp_path / "hub" / "data").mkdir(parents=True)
    write_jsonl(tmp_path / "hub" / "data" / "train-00000-of-00001.jsonl", rows)
    other = write_jsonl(tmp_path / "other.jsonl", rows)
    out = {
        "jsonl": FileSource(str(tmp_path / "rows.jsonl"), eval_fraction=0),
        "json": FileSource(str(tmp_path / "rows.json"), eval_fraction=0),
        "parquet": FileSource(str(tmp_path / "rows.parquet"), eval_fraction=0),
        "hub folder": FileSource(str(tmp_path / "hub"), eval_fraction=0),
        "stream": FileSource(str(tmp_path / "rows.jsonl"), streaming=True),
        "mixture": MixtureSource.from_specs([{"path": str(other), "eval_fraction": 0}], base=FileSource(None)),
    }
    if csv:
        as_text = [{k: v if isinstance(v, str) else json.dumps(v) for k, v in r.items()} for r in rows]
        pd.DataFrame(as_text).to_csv(tmp_path / "rows.csv", index=False)
        out["csv"] = FileSource(str(tmp_path / "rows.csv"), eval_fraction=0)
    return out


def loaded(source) -> list[dict]:
    train = source.load("sft")["train"]
    return train if isinstance(train, list) else [row for _, row in train.rows(0, 0, shuffle=False)]


@pytest.mark.parametrize("form", ["TRL", "ms-swift agent", "LLaMA-Factory ShareGPT"])
def test_every_spelling_reads_alike_in_every_reading_path(tmp_path, form):
    for path, source in reading_paths(tmp_path, [FORMS[form]] * 2, csv="messages" in FORMS[form]).items():
        got = [{k: r[k] for k in ("prompt", "completion", "tools")} for r in loaded(source)]
        assert got == [{"prompt": CANONICAL_PROMPT, "completion": "It is 5.", "tools": [SCHEMA]}] * 2, path


def trained_text(tokenizer, ids: list[int], mask: list[int]) -> str:
    return tokenizer.decode([t for t, m in zip(ids, mask) if m])


@pytest.mark.parametrize("name", ["tiny ChatML", "Qwen2.5 tools", "Llama-3.1 (real template)"])
def test_calls_are_written_by_the_template_trained_and_parse_back_results_never_trained(templates, name):
    if name not in templates:
        pytest.skip("../shared/tokenizers/llama31 is not on this machine")
    tokenizer, parse = templates[name]
    row = to_canonical(FORMS["ms-swift agent"], "sft", "f.jsonl", 1)
    ((prompt_ids, mask, (answer,)),) = encode_turns(
        tokenizer, [row["prompt"]], [[row["completion"]]], tools=[row["tools"]]
    )
    trained = trained_text(tokenizer, prompt_ids, mask)
    calls = parse(_content(tokenizer, trained))
    assert [(c.name, c.arguments, c.error) for c in calls] == [("calc", ARGS, None)]
    rendered = tokenizer.decode(prompt_ids)
    assert "5" in rendered.split(trained)[-1] and "5" not in trained  # the tool's result: context only
    assert tokenizer.decode(answer).startswith("It is 5.")
    # an answer that calls: the completion is the call, as the template writes it
    end = to_canonical({"messages": FORMS["TRL"]["messages"][:2]}, "sft", "f.jsonl", 1)
    ((_, _, (answer,)),) = encode_turns(tokenizer, [end["prompt"]], [[end["completion"]]], tools=[[SCHEMA]])
    assert [(c.name, c.arguments) for c in parse(_content(tokenizer, tokenizer.decode(answer)))] == [("calc", ARGS)]


def _content(tokenizer, text: str) -> str:
    """A trained turn's text without its end-of-turn token (what the policy's answer is parsed from)."""
    for token in ("<|im_end|>", "<|eot_id|>"):
        text = text.replace(token, "")
    return text


def test_a_template_that_writes_calls_elsewhere_than_an_answer_is_named():
    from transformers import AutoTokenizer

    real_template("mistral03")
    tokenizer = AutoTokenizer.from_pretrained(str(TOKENIZERS / "mistral03"))
    assert template_writes_tools(tokenizer) == (True, True)
    row = to_canonical(FORMS["LLaMA-Factory ShareGPT"], "sft", "f.jsonl", 1)
    with pytest.raises(TemplateRefusal, match=r"tool-calling assistant turn inside other markup .*Mistral"):
        encode_turns(tokenizer, [row["prompt"]], [[row["completion"]]], tools=[row["tools"]])


def test_rows_whose_calls_or_schemas_the_template_cannot_write_are_said_once(tiny, tmp_path, caplog):
    path = write_jsonl(tmp_path / "calls.jsonl", [FORMS["TRL"]] * 3)
    dm = SFTDataModule(FileSource(str(path), eval_fraction=0), max_length=512)
    dm.set_tokenizer(tiny[1])
    with caplog.at_level(logging.WARNING, logger="alignlab.data.datamodule"):
        dm.setup()
    said = [r.getMessage() for r in caplog.records]
    assert sum("does not write tool schemas, so the model never sees them" in m for m in said) == 1
    assert sum("trained as Hermes blocks" in m and "algorithm.tool_call_format=hermes" in m for m in said) == 1
    ex = dm.splits["train"][0]
    assert "<tool_call>" in trained_text(tiny[1], ex["prompt_ids"], ex["prompt_mask"])


# -- item 2: a row's own tools in GRPO episodes -------------------------------------------------------------
OTHER = {"type": "function", "function": {"name": "weather", "description": "The weather.", "parameters": {}}}


def test_the_prompt_shows_the_algorithms_tools_then_the_rows_own():
    setup = EpisodeSetup([], [SCHEMA], None, own_environment=True)
    assert episode_schemas(setup, None) == [SCHEMA]
    assert episode_schemas(setup, [OTHER, {**SCHEMA, "note": "row copy"}]) == [SCHEMA, OTHER]  # one per name
    closed = EpisodeSetup([], [SCHEMA], None)
    assert episode_schemas(closed, [SCHEMA]) == [SCHEMA]
    with pytest.raises(
        ConfigError, match=r"row 3, offers the tools \['weather'\] .* only algorithm.tools \(\['calc'\]\)"
    ):
        episode_schemas(closed, [OTHER], "row 3,")


def test_a_rows_tools_reach_the_episode_prompt(tiny):
    qwen = copy.deepcopy(tiny[1])
    qwen.chat_template = QWEN25_TOOLS
    setup = EpisodeSetup([], [SCHEMA], lambda: _Echo(), own_environment=True)
    prompt = [{"role": "user", "content": "Weather?"}]
    (episode,) = open_episodes([prompt], {"tools": [[OTHER]]}, 1, setup, qwen)
    assert episode.prompt_ids == render_prompt(qwen, prompt, [SCHEMA, OTHER])
    assert '"weather"' in qwen.decode(episode.prompt_ids) and '"calc"' in qwen.decode(episode.prompt_ids)


class _Echo:
    def reset(self, row):
        return list(row["prompt"])

    def step(self, messages):
        return [], True, None


@pytest.mark.parametrize("streaming", [False, True], ids=["file", "stream"])
def test_grpo_refuses_rows_offering_tools_nothing_runs_before_anything_is_written(tmp_path, streaming):
    from alignlab.train import train
    from tests.conftest import QUIET, compose

    rows = [{"prompt": "2+3?", "solution": "5", "tools": [OTHER]}] * 4
    path = write_jsonl(tmp_path / "prompts.jsonl", rows)
    overrides = ["algorithm=grpo", "data=custom_prompts", f"data.source.path={path}", "batch_size=2"]
    overrides.append(f"data.source.streaming={str(streaming).lower()}")
    overrides += ["algorithm.tools=[alignlab.tools.calculator]", "algorithm.tool_call_format=hermes", *QUIET]
    with pytest.raises(ConfigError) as err:
        train(compose(overrides, tmp_path / "run"))
    assert (
        str(err.value).startswith(f"{path}")
        and re.search(r", row \d+, offers", str(err.value))
        and "offers the tools ['weather'] in its `tools` column" in str(err.value)
    )
    assert "add them to algorithm.tools" in str(err.value)
    assert not (tmp_path / "run" / "config.yaml").exists()


def test_grpo_warns_when_the_template_shows_no_tool_schemas(tiny, caplog):
    from alignlab.online.multiturn import episode_setup

    with caplog.at_level(logging.WARNING, logger="alignlab.online.multiturn"):
        episode_setup(["alignlab.tools.calculator"], "hermes", None, None, tiny[1])
    assert any("does not write tool schemas, so the prompts never show them" in r.getMessage() for r in caplog.records)


def test_pairs_and_kto_rows_whose_answers_call_tools_train_on_the_calls(templates):
    tokenizer, parse = templates["Qwen2.5 tools"]

    def call(expression):
        return {"type": "function", "function": {"name": "calc", "arguments": {"expression": expression}}}

    asked = [{"role": "user", "content": "2+3?"}]
    pair = {"prompt": asked, "chosen": [{"role": "assistant", "tool_calls": [call("2+3")]}]}
    pair["rejected"] = [{"role": "assistant", "tool_calls": [call("2-3")]}]
    row = to_canonical(pair, "pairwise", "f.jsonl", 1)
    ((_, _, answers),) = encode_turns(tokenizer, [row["prompt"]], [[row["chosen"], row["rejected"]]])
    assert [[c.arguments for c in parse(_content(tokenizer, tokenizer.decode(a)))] for a in answers] == [
        [{"expression": "2+3"}],
        [{"expression": "2-3"}],
    ]
    kto = to_canonical({"messages": [*asked, pair["chosen"][0]], "label": False}, "labelled", "f.jsonl", 1)
    assert kto["label"] is False and kto["completion"]["tool_calls"][0]["function"]["name"] == "calc"


def test_sft_on_tool_call_rows_then_grpo_with_tools_from_that_model_is_one_path(tmp_path):
    """docs/tools.md: SFT on ms-swift agent rows (tiny model: calls as Hermes blocks), then GRPO with the
    calculator and tool_call_format=hermes from the saved model, one step each, through train()."""
    from alignlab.train import train
    from tests.conftest import QUIET, compose

    sft_rows = write_jsonl(tmp_path / "traces.jsonl", [FORMS["ms-swift agent"]] * 4)
    from alignlab.online.tools import tool_schema
    from alignlab.tools.calculator import calculator

    own = [tool_schema(calculator)]  # a row may repeat an algorithm tool's schema: it is shown once
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "2+3?", "solution": "5", "tools": own}] * 4)
    common = ["trainer.max_steps=1", "batch_size=2", "max_length=256", "data.source.eval_fraction=0", *QUIET]
    sft = train(
        compose(["algorithm=sft", "data=custom_sft", f"data.source.path={sft_rows}", *common], tmp_path / "sft")
    )
    grpo = [
        "algorithm=grpo",
        "data=custom_prompts",
        f"data.source.path={prompts}",
        f"model.path={sft['model_dir']}",
        "model.tiny=null",
        "algorithm.tools=[alignlab.tools.calculator]",
        "algorithm.tool_call_format=hermes",
        "algorithm.num_generations=2",
        "algorithm.max_completion_length=16",
        "algorithm.max_turns=2",
    ]
    assert train(compose([*grpo, *common], tmp_path / "grpo"))["steps"] == 1


def test_arguments_and_schemas_that_differ_across_parquet_rows_keep_their_own_names(tmp_path):
    """Arrow gives each struct every row's keys (null where a row has none): those nulls are left out."""

    def row(arguments: dict, parameters: dict) -> dict:
        call = {"type": "function", "function": {"name": "f", "arguments": arguments}}
        schema = {"type": "function", "function": {"name": "f", "parameters": parameters}}
        messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "", "tool_calls": [call]}]
        return {"messages": messages, "tools": [schema]}

    rows = [row({"a": 1}, {"type": "object"}), row({"b": "x"}, {"type": "object", "required": ["b"]})]
    pd.DataFrame(rows).to_parquet(tmp_path / "rows.parquet")
    got = FileSource(str(tmp_path / "rows.parquet"), eval_fraction=0).load("sft")["train"]
    assert [r["completion"]["tool_calls"][0]["function"]["arguments"] for r in got] == [{"a": 1}, {"b": "x"}]
    assert [r["tools"][0]["function"]["parameters"] for r in got] == [
        p["tools"][0]["function"]["parameters"] for p in rows
    ]


@pytest.mark.parametrize("form", ["TRL", "ms-swift agent"])
def test_a_call_turn_marked_loss_false_stays_untrained(templates, form):
    """ms-swift's per-message `loss` survives the reading of a call turn into the canonical form."""
    tokenizer, parse = templates["Qwen2.5 tools"]
    raw = copy.deepcopy(FORMS[form])
    raw["messages"][1]["loss"] = False
    row = to_canonical(raw, "sft", "f.jsonl", 1)
    assert row["prompt"][1]["loss"] is False and row["prompt"][1]["tool_calls"]
    ((ids, mask, (answer,)),) = encode_turns(tokenizer, [row["prompt"]], [[row["completion"]]], tools=[row["tools"]])
    assert mask is None  # the call is context only: no earlier turn is trained
    assert "<tool_call>" in tokenizer.decode(ids) and tokenizer.decode(answer).startswith("It is 5.")
    raw["messages"][1]["loss"] = True  # and marked true it trains, whatever data.train_on says
    row = to_canonical(raw, "sft", "f.jsonl", 1)
    ((ids, mask, _),) = encode_turns(
        tokenizer, [row["prompt"]], [[row["completion"]]], tools=[row["tools"]], default=False
    )
    assert [c.name for c in parse(_content(tokenizer, trained_text(tokenizer, ids, mask)))] == ["calc"]
