"""The row forms other trainers and the Hub use, each turned into alignlab's canonical rows; column maps,
tools; and the errors for rows that match no form."""

from __future__ import annotations

import json

import pytest

from alignlab.data.formats import check_mapped_columns, common_prompt, hh_messages
from alignlab.data.rows import to_canonical
from alignlab.errors import DataError
from tests.data.test_data import assistant, system, user

HH_CHOSEN = "\n\nHuman: What is 2+2?\n\nAssistant: 4.\n\nHuman: And 3+3?\n\nAssistant: It is 6."
HH_REJECTED = "\n\nHuman: What is 2+2?\n\nAssistant: 4.\n\nHuman: And 3+3?\n\nAssistant: It is 7."
HH_PROMPT = [user("What is 2+2?"), assistant("4."), user("And 3+3?")]

# (form, row as its file gives it, kind, the canonical row expected)
FORMS = [
    (
        "ShareGPT",
        {"conversations": [{"from": "human", "value": "2+2="}, {"from": "gpt", "value": "4"}]},
        "sft",
        {"prompt": [user("2+2=")], "completion": "4"},
    ),
    (
        "ShareGPT, system turn and several turns",
        {
            "conversations": [
                {"from": "system", "value": "Be brief."},
                {"from": "human", "value": "hi"},
                {"from": "gpt", "value": "hello"},
                {"from": "human", "value": "2+2="},
                {"from": "gpt", "value": "4"},
            ]
        },
        "sft",
        {"prompt": [system("Be brief."), user("hi"), assistant("hello"), user("2+2=")], "completion": "4"},
    ),
    (
        "ShareGPT, `system` column",
        {"conversations": [{"from": "human", "value": "2+2="}, {"from": "gpt", "value": "4"}], "system": "Be brief."},
        "sft",
        {"prompt": [system("Be brief."), user("2+2=")], "completion": "4"},
    ),
    (
        "ShareGPT pair (LLaMA-Factory)",
        {
            "conversations": [{"from": "human", "value": "2+2="}],
            "chosen": {"from": "gpt", "value": "4"},
            "rejected": {"from": "gpt", "value": "5"},
        },
        "pairwise",
        {"prompt": [user("2+2=")], "chosen": "4", "rejected": "5"},
    ),
    (
        "Alpaca",
        {"instruction": "Add the numbers.", "input": "2 and 2", "output": "4"},
        "sft",
        {"prompt": [user("Add the numbers.\n2 and 2")], "completion": "4"},
    ),
    (
        "Alpaca, empty input",
        {"instruction": "What is 2+2?", "input": "", "output": "4"},
        "sft",
        {"prompt": [user("What is 2+2?")], "completion": "4"},
    ),
    (
        "Alpaca, system and history",
        {"instruction": "And 3+3?", "output": "6", "system": "Be brief.", "history": [["2+2?", "4"]]},
        "sft",
        {"prompt": [system("Be brief."), user("2+2?"), assistant("4"), user("And 3+3?")], "completion": "6"},
    ),
    (
        "Alpaca pair",
        {"instruction": "What is 2+2?", "input": "", "chosen": "4", "rejected": "5"},
        "pairwise",
        {"prompt": [user("What is 2+2?")], "chosen": "4", "rejected": "5"},
    ),
    (
        "Alpaca, KTO",
        {"instruction": "What is 2+2?", "output": "5", "label": False},
        "labelled",
        {"prompt": [user("What is 2+2?")], "completion": "5", "label": False},
    ),
    (
        "Anthropic HH",
        {"chosen": HH_CHOSEN, "rejected": HH_REJECTED},
        "pairwise",
        {"prompt": HH_PROMPT, "chosen": "It is 6.", "rejected": "It is 7."},
    ),
    (
        "Anthropic HH, SFT on chosen",
        {"chosen": HH_CHOSEN, "rejected": HH_REJECTED},
        "sft",
        {"prompt": HH_PROMPT, "completion": "It is 6."},
    ),
    ("Anthropic HH, prompts", {"chosen": HH_CHOSEN, "rejected": HH_REJECTED}, "prompt", {"prompt": HH_PROMPT}),
    (
        "Anthropic HH, explicit prompt ending in the empty assistant turn",
        {"prompt": "\n\nHuman: What is 2+2?\n\nAssistant:", "chosen": " 4.", "rejected": " 5."},
        "pairwise",
        {"prompt": [user("What is 2+2?")], "chosen": " 4.", "rejected": " 5."},
    ),
    (
        "TRL standard, implicit prompt",
        {"chosen": "The sky is blue.", "rejected": "The sky is green."},
        "pairwise",
        {"prompt": [user("The sky is")], "chosen": " blue.", "rejected": " green."},
    ),
    (
        "TRL standard, implicit prompt, SFT on the chosen text",
        {"chosen": "The sky is blue.", "rejected": "The sky is green."},
        "sft",
        {"prompt": [user("The sky is")], "completion": " blue."},
    ),
    (
        "TRL standard, explicit prompt",
        {"prompt": "The sky is", "chosen": " blue.", "rejected": " green."},
        "pairwise",
        {"prompt": [user("The sky is")], "chosen": " blue.", "rejected": " green."},
    ),
    (
        "TRL conversational, implicit prompt",
        {"chosen": [user("2+2="), assistant("4")], "rejected": [user("2+2="), assistant("5")]},
        "pairwise",
        {"prompt": [user("2+2=")], "chosen": "4", "rejected": "5"},
    ),
    (
        "TRL conversational, explicit prompt",
        {"prompt": [user("2+2=")], "chosen": [assistant("4")], "rejected": [assistant("5")]},
        "pairwise",
        {"prompt": [user("2+2=")], "chosen": "4", "rejected": "5"},
    ),
    (
        "TRL conversational prompt-completion",
        {"prompt": [user("2+2=")], "completion": [assistant("4")]},
        "sft",
        {"prompt": [user("2+2=")], "completion": "4"},
    ),
    (
        "KTO, completion as messages",
        {"prompt": [user("2+2=")], "completion": [assistant("5")], "label": False},
        "labelled",
        {"prompt": [user("2+2=")], "completion": "5", "label": False},
    ),
    (
        "UltraFeedback (scores pass through, `messages` does not)",
        {
            "prompt": "2+2=",
            "prompt_id": "abc",
            "chosen": [user("2+2="), assistant("4")],
            "rejected": [user("2+2="), assistant("5")],
            "messages": [user("2+2="), assistant("4")],
            "score_chosen": 9.0,
            "score_rejected": 2.5,
        },
        "pairwise",
        {
            "prompt": [user("2+2=")],
            "chosen": "4",
            "rejected": "5",
            "prompt_id": "abc",
            "score_chosen": 9.0,
            "score_rejected": 2.5,
        },
    ),
    (
        "ms-swift `rejected_messages`",
        {"messages": [user("2+2="), assistant("4")], "rejected_messages": [user("2+2="), assistant("5")]},
        "pairwise",
        {"prompt": [user("2+2=")], "chosen": "4", "rejected": "5"},
    ),
    (
        "ms-swift `rejected_response`",
        {"messages": [user("2+2="), assistant("4")], "rejected_response": "5"},
        "pairwise",
        {"prompt": [user("2+2=")], "chosen": "4", "rejected": "5"},
    ),
]


@pytest.mark.parametrize(("form", "raw", "kind", "expected"), FORMS, ids=[f[0] for f in FORMS])
def test_each_form_becomes_the_canonical_row(form, raw, kind, expected):
    assert to_canonical(raw, kind, "data.jsonl", 1) == expected


def test_a_file_of_each_form_reads_through_the_file_source(tmp_path):
    from alignlab.data.files import FileSource

    for i, (_, raw, kind, expected) in enumerate(FORMS):
        path = tmp_path / f"form{i}.jsonl"
        path.write_text(json.dumps(raw) + "\n" + json.dumps(raw) + "\n")
        rows = FileSource(str(path), eval_fraction=0).load(kind)["train"]
        assert rows == [expected, expected]


def test_hh_transcripts_split_into_turns():
    assert hh_messages("\n\nHuman: hi there \n\nAssistant:  hello\n\nHuman: bye") == [
        user("hi there"),
        assistant("hello"),
        user("bye"),
    ]
    assert hh_messages("Human: a\n\nAssistant: b") == [user("a"), assistant("b")]
    assert hh_messages("What is 2+2?") is None
    assert hh_messages("Human: no assistant turn") is None


def test_the_implicit_prompt_is_cut_as_trl_cuts_it():
    extract_prompt = pytest.importorskip("trl.data_utils", reason="TRL is not installed").extract_prompt

    cases = [
        ("The sky is blue.", "The sky is green."),
        ("abc", "abd"),
        ("Say yes: yes", "Say yes: no"),
        ("x", "y"),
    ]
    for chosen, rejected in cases:
        ours = common_prompt(chosen, rejected)
        theirs = extract_prompt({"chosen": chosen, "rejected": rejected})
        assert ours == (theirs["prompt"], theirs["chosen"], theirs["rejected"]), (chosen, rejected)
    # one text the beginning of the other: the shorter is all prompt (TRL keeps its last character as the answer)
    assert common_prompt("short", "short and long") == ("short", "", " and long")
    with pytest.raises(DataError, match=r"row 1, field 'chosen': the answer is empty"):
        to_canonical({"chosen": "short", "rejected": "short and long"}, "pairwise", "p.jsonl", 1)


@pytest.mark.parametrize(
    ("raw", "kind", "field", "message"),
    [
        (  # HH: the two transcripts hold different conversations before their last answer
            {"chosen": HH_CHOSEN, "rejected": HH_REJECTED.replace("And 3+3?", "And 4+4?")},
            "pairwise",
            "rejected",
            "answers another conversation than `chosen` "
            "(message 2 is user 'And 4+4?' where `chosen` has user 'And 3+3?')",
        ),
        (
            {"chosen": "\n\nHuman: hi\n\nAssistant:", "rejected": "\n\nHuman: hi\n\nAssistant: yo"},
            "pairwise",
            "chosen",
            "message 1 (assistant) is empty",
        ),
        (
            {"messages": [user("2+2="), assistant("4")], "rejected_messages": [user("3+3="), assistant("5")]},
            "pairwise",
            "rejected_messages",
            "its prompt turns differ from `messages` (message 0 is user '3+3=' where `messages` has user '2+2=')",
        ),
        (
            {"messages": [user("2+2="), assistant("4")], "rejected_messages": [user("2+2="), assistant("4")]},
            "pairwise",
            "rejected_messages",
            "identical to the chosen answer",
        ),
        (
            {"conversations": [{"from": "alien", "value": "hi"}, {"from": "gpt", "value": "4"}]},
            "sft",
            "conversations",
            "turn 0 has from 'alien'; expected one of",
        ),
        ({"conversations": [{"role_x": "human"}]}, "sft", "conversations", "turn 0 must be an object with 'from'"),
        ({"conversations": []}, "sft", "conversations", "expected a non-empty list of turns"),
        ({"instruction": 3, "output": "4"}, "sft", "instruction", "expected text, got int"),
        ({"instruction": "q", "input": 3, "output": "4"}, "sft", "input", "expected text, got int"),
        ({"instruction": "q", "output": "4", "history": [["a"]]}, "sft", "history", "[question, answer] pairs"),
        ({"prompt": "q", "completion": "4", "tools": "{not json"}, "sft", "tools", "not JSON"),
        ({"prompt": "q", "completion": "4", "tools": {"name": "f"}}, "sft", "tools", "a list of tool schemas"),
        ({"prompt": "q", "completion": "4", "tools": "[1, 2]"}, "sft", "tools", "a list of tool schemas"),
    ],
)
def test_malformed_rows_of_a_form_name_file_row_and_field(raw, kind, field, message):
    with pytest.raises(DataError) as err:
        to_canonical(raw, kind, "data/train.jsonl", 7)
    text = str(err.value)
    assert text.startswith(f"data/train.jsonl, row 7, field '{field}'"), text
    assert message in text, text


@pytest.mark.parametrize(
    ("raw", "kind", "field"),
    [
        ({"text": "hello world"}, "sft", "completion"),
        ({"question": "2+2=", "answer": "4"}, "prompt", "messages"),
        ({"question": "2+2=", "good": "4", "bad": "5"}, "pairwise", "chosen"),
        ({"chosen": "4", "rejected": "5"}, "pairwise", "prompt"),  # texts with no shared beginning: no prompt
    ],
)
def test_a_row_of_no_known_form_names_its_columns_and_the_forms_accepted(raw, kind, field):
    with pytest.raises(DataError) as err:
        to_canonical(raw, kind, "data/train.jsonl", 3)
    text = str(err.value)
    assert text.startswith(f"data/train.jsonl, row 3, field '{field}': missing"), text
    assert f"the row has columns {list(raw)}" in text
    for form in ("ShareGPT", "Alpaca", "`messages`", "implicit prompt"):
        assert form in text


def test_column_map_renames_before_conversion():
    raw = {"question": "2+2=", "answer": "4", "id": 5}
    row = to_canonical(raw, "prompt", "q.jsonl", 1, columns={"question": "prompt", "answer": "solution"})
    assert row == {"prompt": [user("2+2=")], "solution": "4", "id": 5}
    pair = {"q": "2+2=", "good": "4", "bad": "5"}
    row = to_canonical(pair, "pairwise", "p.jsonl", 1, columns={"q": "prompt", "good": "chosen", "bad": "rejected"})
    assert row == {"prompt": [user("2+2=")], "chosen": "4", "rejected": "5"}
    # a mapped name a row lacks (an optional column) is not the row's fault
    assert to_canonical({"q": "2+2="}, "prompt", "q.jsonl", 1, columns={"q": "prompt", "gold": "solution"}) == {
        "prompt": [user("2+2=")]
    }


@pytest.mark.parametrize(
    ("raw", "kind", "columns", "expected"),
    [
        (
            {"question": " ", "answer": "4"},
            "prompt",
            {"question": "prompt"},
            "field 'question': (read as `prompt`) prompt is empty",
        ),
        (
            {"q": "2+2=", "good": "4", "bad": "4"},
            "pairwise",
            {"q": "prompt", "good": "chosen", "bad": "rejected"},
            "field 'bad': (read as `rejected`) identical to the chosen answer",
        ),
        (
            {"q": "2+2=", "good": "4"},
            "pairwise",
            {"q": "prompt", "good": "chosen"},
            "field 'rejected': missing; the row has columns ['q', 'good']",
        ),
        (
            {"conversations": [{"from": "human", "value": "hi"}]},
            "sft",
            None,
            "field 'conversations': (read as `messages`) must end with an assistant answer",
        ),
        (
            {"instruction": "q", "output": " "},
            "sft",
            None,
            "field 'output': (read as `completion`) the answer is empty",
        ),
        ({"instruction": "", "output": "4"}, "sft", None, "field 'instruction': (read as `prompt`) prompt is empty"),
    ],
)
def test_errors_name_the_column_as_the_file_names_it(raw, kind, columns, expected):
    with pytest.raises(DataError) as err:
        to_canonical(raw, kind, "f.jsonl", 3, columns=columns)
    assert str(err.value).startswith(f"f.jsonl, row 3, {expected}"), str(err.value)


def test_column_map_onto_a_column_the_row_has_is_refused():
    with pytest.raises(
        DataError, match=r"q\.jsonl, row 2, field 'question': data\.columns renames 'question' to 'prompt'"
    ):
        to_canonical({"question": "a", "prompt": "b"}, "prompt", "q.jsonl", 2, columns={"question": "prompt"})


def test_column_map_names_absent_from_the_file_are_refused_naming_them(tmp_path):
    from alignlab.data.files import FileSource

    rows = [{"question": "2+2=", "answer": "4"}, {"question": "3+3=", "answer": "6"}]
    with pytest.raises(DataError, match=r"data\.columns names \['qestion', 'gold'\] but no row"):
        check_mapped_columns(rows, {"qestion": "prompt", "answer": "solution", "gold": "x"}, "q.jsonl")
    check_mapped_columns(rows, {"question": "prompt"}, "q.jsonl")
    path = tmp_path / "q.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    with pytest.raises(DataError, match=r"q\.jsonl: data\.columns names \['qestion'\]"):
        FileSource(str(path)).load("prompt", columns={"qestion": "prompt"})
    loaded = FileSource(str(path), eval_fraction=0).load("prompt", columns={"question": "prompt", "answer": "solution"})
    assert loaded["train"][1] == {"prompt": [user("3+3=")], "solution": "6"}


def test_tools_column_becomes_a_list_of_schemas():
    tool = {"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}
    for given in ([tool], json.dumps([tool])):
        row = to_canonical({"prompt": "2+2=", "completion": "4", "tools": given}, "sft", "t.jsonl", 1)
        assert row == {"prompt": [user("2+2=")], "completion": "4", "tools": [tool]}
    for empty in (None, [], "", "[]"):
        row = to_canonical({"prompt": "2+2=", "completion": "4", "tools": empty}, "sft", "t.jsonl", 1)
        assert "tools" not in row


# -- files in the Hub's forms train through train() --------------------------------------------------
def _write(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def _hh_rows(n):
    out = []
    for i in range(n):
        a, b = i % 7, i % 5
        prompt = f"\n\nHuman: hi\n\nAssistant: hello\n\nHuman: {a}+{b}="
        out.append({"chosen": f"{prompt}\n\nAssistant: {a + b}", "rejected": f"{prompt}\n\nAssistant: {a + b + 1}"})
    return out


@pytest.mark.parametrize(
    ("form", "algorithm", "data", "rows"),
    [
        ("hh", "dpo", "custom_pairs", _hh_rows(16)),
        (
            "sharegpt",
            "sft",
            "custom_sft",
            [
                {
                    "conversations": [
                        {"from": "system", "value": "Add."},
                        {"from": "human", "value": f"{i}+1="},
                        {"from": "gpt", "value": str(i + 1)},
                        {"from": "human", "value": f"{i}+2="},
                        {"from": "gpt", "value": str(i + 2)},
                    ]
                }
                for i in range(16)
            ],
        ),
        (
            "alpaca",
            "sft",
            "custom_sft",
            [{"instruction": "Add.", "input": f"{i}+3", "output": str(i + 3)} for i in range(16)],
        ),
        (
            "ultrafeedback",
            "dpo",
            "custom_pairs",
            [
                {
                    "prompt": f"{i}+4=",
                    "chosen": [user(f"{i}+4="), assistant(str(i + 4))],
                    "rejected": [user(f"{i}+4="), assistant(str(i + 5))],
                    "messages": [user(f"{i}+4="), assistant(str(i + 4))],
                    "score_chosen": 8.0,
                    "score_rejected": 3.0,
                }
                for i in range(16)
            ],
        ),
    ],
)
def test_a_file_of_each_hub_form_trains(tmp_path, form, algorithm, data, rows):
    from alignlab.train import train
    from tests.conftest import QUIET, compose

    path = _write(tmp_path / f"{form}.jsonl", rows)
    run = tmp_path / "run"
    overrides = [f"algorithm={algorithm}", f"data={data}", f"data.source.path={path}", "data.source.eval_fraction=0.25"]
    cfg = compose([*overrides, "trainer.max_steps=2", "batch_size=4", "eval_batch_size=4", *QUIET], run)
    result = train(cfg)
    assert result["steps"] == 2 and (run / "summary.json").exists()


def test_column_map_system_and_truncation_from_the_command_line_train(tmp_path):
    from alignlab.train import train
    from tests.conftest import QUIET, compose

    rows = [{"question": f"{i}+1=", "answer": str(i + 1)} for i in range(15)]
    rows.append({"question": "long " * 60 + "1+1=", "answer": "2"})  # a prompt past max_length=128
    path = _write(tmp_path / "qa.jsonl", rows)
    run = tmp_path / "run"
    overrides = [
        "algorithm=sft",
        "data=custom_sft",
        f"data.source.path={path}",
        f"data.source.eval_path={path}",
        "data.columns={question:prompt,answer:completion}",
        "data.system=Add.",
        "data.truncation=keep_start",
        "max_length=128",  # under the long prompt (max_length=auto would take the whole row)
    ]
    result = train(compose([*overrides, "trainer.max_steps=2", "batch_size=4", *QUIET], run))
    assert result["steps"] == 2 and result["shortened_prompts"] == {"train": 1, "eval": 1}
    assert result["dropped_rows"] == {"train": 0, "eval": 0}


# -- the registry of recognised forms, and data.row_converter (a user's own form) ----------------------------
CONVERTERS = '''
def to_pair(row):
    """A lab's own form: {"q": ..., "good": ..., "bad": ...}."""
    return {"prompt": row["q"], "chosen": row["good"], "rejected": row["bad"]}


def tagged(row, tag):
    return {**to_pair(row), "source_tag": tag}


def boom(row):
    if row["q"] == "3+3=":
        raise ValueError("no such form")
    return to_pair(row)


def a_list(row):
    return [row]


def garbage(row):
    return {"question": row["q"]}
'''


def test_each_recognised_form_is_one_registered_converter_tried_in_order():
    from alignlab.data.formats import ACCEPTED_FORMS, CANONICAL_FORMS, ROW_FORMS

    built_in = ("openai_preference", "tools_text", "messages_prompt", "sharegpt", "alpaca", "hh")
    assert [n for n in ROW_FORMS.names() if n in built_in] == list(built_in)  # tried in this order, others between
    assert ROW_FORMS.names()[-1] == "tool_calls"  # every other form's tool-call spellings, made canonical last
    described = [ROW_FORMS[n].described for n in ROW_FORMS if ROW_FORMS[n].described]
    assert ACCEPTED_FORMS == (*CANONICAL_FORMS, *described) and len(described) >= 5


def _pairs_file(tmp_path, module: str):
    """A JSONL file of a form no trainer writes, and `module` (importable) holding converters for it."""
    (tmp_path / f"{module}.py").write_text(CONVERTERS)
    path = tmp_path / "lab.jsonl"
    rows = [{"q": "2+2=", "good": "4", "bad": "5"}, {"q": "3+3=", "good": "6", "bad": "7"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_a_row_converter_reads_a_form_of_ones_own(tmp_path, monkeypatch):
    from alignlab.data import PairwiseDataModule
    from alignlab.data.files import FileSource

    path = _pairs_file(tmp_path, "lab_form_ok")
    monkeypatch.syspath_prepend(str(tmp_path))
    dm = PairwiseDataModule(FileSource(str(path), eval_fraction=0), row_converter="lab_form_ok.to_pair")
    assert dm.read()["train"] == [
        {"prompt": [user("2+2=")], "chosen": "4", "rejected": "5"},
        {"prompt": [user("3+3=")], "chosen": "6", "rejected": "7"},
    ]
    spec = {"_target_": "lab_form_ok.tagged", "tag": "lab"}  # keyword arguments bound, as Hydra writes them
    rows = PairwiseDataModule(FileSource(str(path), eval_fraction=0), row_converter=spec).read()["train"]
    assert [r["source_tag"] for r in rows] == ["lab", "lab"]


def test_a_row_converter_that_fails_is_named_with_file_and_row(tmp_path, monkeypatch):
    from alignlab.data import PairwiseDataModule
    from alignlab.data.arith import ArithTask
    from alignlab.data.files import FileSource
    from alignlab.errors import ConfigError

    path = _pairs_file(tmp_path, "lab_form_bad")
    monkeypatch.syspath_prepend(str(tmp_path))

    def read(converter):
        return PairwiseDataModule(FileSource(str(path), eval_fraction=0), row_converter=converter).read()

    with pytest.raises(DataError, match=rf"^{path}, row 2: data.row_converter lab_form_bad.boom raised ValueError"):
        read("lab_form_bad.boom")
    with pytest.raises(DataError, match=rf"^{path}, row 1: data.row_converter lab_form_bad.a_list returned list, not"):
        read("lab_form_bad.a_list")
    garbage = (
        rf"^{path}, row 1, field 'chosen': \(in the row data.row_converter lab_form_bad.garbage returned\) missing"
    )
    with pytest.raises(DataError, match=garbage):
        read("lab_form_bad.garbage")
    with pytest.raises(ConfigError, match="data.row_converter 'lab_form_bad.nothing' could not be imported"):
        read("lab_form_bad.nothing")
    with pytest.raises(ConfigError, match="data.row_converter converts the rows of data files, but ArithTask reads"):
        PairwiseDataModule(ArithTask(n_train=4, n_eval=2), row_converter="lab_form_bad.to_pair").read()
