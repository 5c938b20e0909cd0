"""The data fault kinds of the shared failing inputs (see tests/data/test_data_cases.py), each tried in the
row forms, file types and reading paths added since: ShareGPT, Alpaca, Anthropic HH, TRL's conversational
forms, UltraFeedback, ms-swift `rejected_messages`, KTO messages; JSON, CSV and Parquet files, Hub-shaped
folders and Hub ids; streaming; mixtures (`data.sources`); `data.truncation`; `data.system`; `tools`."""

from __future__ import annotations

import copy
import json

import pandas as pd
import pytest

from alignlab.data import PairwiseDataModule, PromptDataModule, SFTDataModule
from alignlab.data.files import FileSource
from alignlab.data.mixture import MixtureSource
from alignlab.data.rows import to_canonical
from alignlab.data.truncation import shorten_prompt
from alignlab.errors import DataError
from tests.data.folders import assistant, user, write_jsonl


def system(text: str) -> dict:
    return {"role": "system", "content": text}


def turn(who: str, text: str) -> dict:
    return {"from": who, "value": text}


def hh(*turns: str) -> str:
    return "".join(f"\n\n{'Human' if i % 2 == 0 else 'Assistant'}: {t}" for i, t in enumerate(turns))


GOOD = {
    "sft": {"prompt": "1+1=", "completion": "2"},
    "pairwise": {"prompt": "1+1=", "chosen": "2", "rejected": "3"},
    "labelled": {"prompt": "1+1=", "completion": "2", "label": True},
    "prompt": {"prompt": "1+1="},
}
ZERO_WIDTH = "\u200b\ufeff"  # a zero-width space and a byte-order mark: text that shows nothing

# (form, a row whose user content is empty or blank, kind, the field the error names)
EMPTY = [
    ("ShareGPT", {"conversations": [turn("human", ""), turn("gpt", "4")]}, "sft", "conversations"),
    (
        "ShareGPT, later turn",
        {"conversations": [turn("human", "hi"), turn("gpt", "yo"), turn("human", "  ")]},
        "prompt",
        "conversations",
    ),
    ("ShareGPT, zero-width", {"conversations": [turn("human", ZERO_WIDTH), turn("gpt", "4")]}, "sft", "conversations"),
    (
        "LLaMA-Factory pair",
        {"conversations": [turn("human", " ")], "chosen": turn("gpt", "4"), "rejected": turn("gpt", "5")},
        "pairwise",
        "conversations",
    ),
    (
        "LLaMA-Factory KTO",
        {"conversations": [turn("human", "\n"), turn("gpt", "4")], "kto_tag": True},
        "labelled",
        "conversations",
    ),
    ("Alpaca", {"instruction": "", "input": "", "output": "4"}, "sft", "instruction"),
    ("Alpaca, blank instruction", {"instruction": " \t", "output": "4"}, "sft", "instruction"),
    (
        "Alpaca pair",
        {"instruction": "  ", "input": ZERO_WIDTH, "chosen": "4", "rejected": "5"},
        "pairwise",
        "instruction",
    ),
    (
        "Alpaca, empty history question",
        {"instruction": "2+2=", "output": "4", "history": [["", "hi"]]},
        "sft",
        "instruction",
    ),
    ("Anthropic HH", {"chosen": hh("", "4"), "rejected": hh("", "5")}, "pairwise", "chosen"),
    (
        "Anthropic HH, later turn",
        {"chosen": hh("hi", "yo", " ", "4"), "rejected": hh("hi", "yo", " ", "5")},
        "pairwise",
        "chosen",
    ),
    (
        "TRL conversational, implicit prompt",
        {"chosen": [user(" "), assistant("4")], "rejected": [user(" "), assistant("5")]},
        "pairwise",
        "chosen",
    ),
    (
        "TRL conversational, explicit prompt",
        {"prompt": [user("")], "chosen": [assistant("4")], "rejected": [assistant("5")]},
        "pairwise",
        "prompt",
    ),
    ("TRL prompt-completion messages", {"prompt": [user(ZERO_WIDTH)], "completion": [assistant("4")]}, "sft", "prompt"),
    ("TRL standard, zero-width prompt", {"prompt": ZERO_WIDTH, "chosen": "4", "rejected": "5"}, "pairwise", "prompt"),
    (
        "UltraFeedback, blank prompt",
        {"prompt": ZERO_WIDTH, "chosen": [assistant("4")], "rejected": [assistant("5")]},
        "pairwise",
        "prompt",
    ),
    (
        "UltraFeedback, blank user turns",
        {"prompt": "2+2=", "chosen": [user(" "), assistant("4")], "rejected": [user(" "), assistant("5")]},
        "pairwise",
        "chosen",
    ),
    (
        "ms-swift rejected_messages",
        {"messages": [user("2+2="), assistant("4")], "rejected_messages": [user(""), assistant("5")]},
        "pairwise",
        "rejected_messages",
    ),
    (
        "ms-swift rejected_response",
        {"messages": [system("s"), user("  "), assistant("4")], "rejected_response": "5"},
        "pairwise",
        "messages",
    ),
    ("KTO messages", {"messages": [user(" "), assistant("4")], "label": False}, "labelled", "messages"),
    (
        "KTO completion as messages",
        {"prompt": [user("")], "completion": [assistant("4")], "label": True},
        "labelled",
        "prompt",
    ),
    (
        "content parts",
        {"messages": [{"role": "user", "content": [{"type": "text", "text": " "}]}, assistant("4")]},
        "sft",
        "messages",
    ),
]


def empty_file(tmp_path, raw: dict, kind: str, suffix: str = "jsonl"):
    """A file whose row 1 is good and row 2 is `raw`."""
    path = tmp_path / f"rows.{suffix}"
    if suffix == "json":
        path.write_text(json.dumps([GOOD[kind], raw]))
        return path
    return write_jsonl(path, [GOOD[kind], raw])


@pytest.mark.parametrize(("form", "raw", "kind", "field"), EMPTY, ids=[e[0] for e in EMPTY])
def test_empty_user_content_is_refused_in_every_form_naming_file_row_and_field(tmp_path, form, raw, kind, field):
    path = empty_file(tmp_path, raw, kind)
    with pytest.raises(DataError) as err:
        FileSource(str(path)).load(kind)
    assert str(err.value).startswith(f"{path}, row 2, field '{field}': ")
    assert "empty" in str(err.value)


@pytest.mark.parametrize(("form", "raw", "kind", "field"), [e for e in EMPTY if e[2] != "labelled"][::3])
def test_empty_user_content_is_refused_when_streamed_mixed_or_in_a_json_document(tmp_path, form, raw, kind, field):
    """Streaming (KTO data cannot stream) checks its first rows before anything is written."""
    path = empty_file(tmp_path, raw, kind)
    with pytest.raises(DataError, match=rf"^{path}, row 2, field '{field}': .*empty"):
        FileSource(str(path), streaming=True).load(kind)
    document = empty_file(tmp_path, raw, kind, "json")
    good = write_jsonl(tmp_path / "good.jsonl", [GOOD[kind]] * 3)
    mix = MixtureSource.from_specs([{"path": str(good)}, {"path": str(document)}], base=FileSource(None))
    with pytest.raises(DataError, match=rf"^{document}, row 2, field '{field}': .*empty"):
        mix.load(kind)


def test_a_stream_whose_every_row_is_empty_stops_when_opened_as_a_file_does(tmp_path):
    path = write_jsonl(tmp_path / "rows.jsonl", [{"conversations": [turn("human", " "), turn("gpt", "4")]}] * 3)
    expected = f"every one of its 3 rows is bad; the first: {path}, row 1, field 'conversations'"
    for streaming in (False, True):
        with pytest.raises(DataError, match=f"^{path}: {expected}"):
            FileSource(str(path), streaming=streaming).load("sft", on_bad_row="skip")


ALLOWED = [
    (
        "ShareGPT, empty system turn",
        {"conversations": [turn("system", ""), turn("human", "2+2="), turn("gpt", "4")]},
        {"prompt": [system(""), user("2+2=")], "completion": "4"},
    ),
    (
        "ShareGPT, empty system column",
        {"conversations": [turn("human", "2+2="), turn("gpt", "4")], "system": ""},
        {"prompt": [user("2+2=")], "completion": "4"},
    ),
    (
        "messages, empty system message",
        {"messages": [system(" "), user("2+2="), assistant("4")]},
        {"prompt": [system(" "), user("2+2=")], "completion": "4"},
    ),
    (
        "Alpaca, empty input",
        {"instruction": "2+2=", "input": "", "output": "4"},
        {"prompt": [user("2+2=")], "completion": "4"},
    ),
    (
        "Alpaca, blank instruction: the input is the question",
        {"instruction": " ", "input": "2+2=", "output": "4"},
        {"prompt": [user("2+2=")], "completion": "4"},
    ),
]


@pytest.mark.parametrize(("form", "raw", "expected"), ALLOWED, ids=[a[0] for a in ALLOWED])
def test_an_empty_system_message_or_alpaca_input_stays_allowed(form, raw, expected):
    assert to_canonical(raw, "sft", "f.jsonl", 1) == expected


def test_an_empty_data_system_is_an_empty_system_message(tmp_path):
    path = write_jsonl(tmp_path / "rows.jsonl", [GOOD["sft"]])
    rows = SFTDataModule(FileSource(str(path), eval_fraction=0), system="").read()["train"]
    assert rows[0]["prompt"] == [system(""), user("1+1=")]


def test_keep_start_never_cuts_a_message_to_blank_text():
    length = lambda messages: sum(len(m["content"]) + 2 for m in messages)  # noqa: E731
    prompt = [user(" " * 5 + "b" * 10)]
    # room for the answer's 5 tokens only with 3 characters left, all blank: the looser cut, past the spaces
    assert shorten_prompt(prompt, "keep_start", length, 5, 10) == [user(" " * 5 + "bb")]
    assert shorten_prompt(prompt, "keep_start", length, 5, 8) is None  # every cut that fits is blank


# -- rejected_prompt_mismatch ----------------------------------------------------------------------
MISMATCH = [
    (
        "LLaMA-Factory pair, rejected as a conversation",
        {
            "conversations": [turn("human", "2+2=")],
            "chosen": turn("gpt", "4"),
            "rejected": [turn("human", "3+3="), turn("gpt", "5")],
        },
        "rejected",
    ),
    (
        "ms-swift rejected_messages",
        {"messages": [user("2+2="), assistant("4")], "rejected_messages": [user("3+3="), assistant("5")]},
        "rejected_messages",
    ),
    (
        "ms-swift rejected_messages, earlier turn",
        {
            "messages": [user("hi"), assistant("yo"), user("2+2="), assistant("4")],
            "rejected_messages": [user("hey"), assistant("yo"), user("2+2="), assistant("5")],
        },
        "rejected_messages",
    ),
    (
        "ms-swift rejected_messages, system message",
        {"messages": [system("A"), user("2+2="), assistant("4")], "rejected_messages": [user("2+2="), assistant("5")]},
        "rejected_messages",
    ),
    (
        "TRL conversational, implicit prompt",
        {"chosen": [user("2+2="), assistant("4")], "rejected": [user("3+3="), assistant("5")]},
        "rejected",
    ),
    (
        "TRL conversational, explicit prompt",
        {"prompt": [user("2+2=")], "chosen": [assistant("4")], "rejected": [user("3+3="), assistant("5")]},
        "rejected",
    ),
    (
        "UltraFeedback",
        {"prompt": "2+2=", "chosen": [user("2+2="), assistant("4")], "rejected": [user("3+3="), assistant("5")]},
        "rejected",
    ),
    (
        "UltraFeedback, chosen",
        {"prompt": "2+2=", "chosen": [user("3+3="), assistant("6")], "rejected": [user("2+2="), assistant("5")]},
        "chosen",
    ),
    ("Anthropic HH", {"chosen": hh("hi", "yo", "2+2=", "4"), "rejected": hh("hey", "yo", "2+2=", "5")}, "rejected"),
]


@pytest.mark.parametrize("streaming", [False, True], ids=["file", "stream"])
@pytest.mark.parametrize(("form", "raw", "field"), MISMATCH, ids=[m[0] for m in MISMATCH])
def test_answers_to_different_prompts_are_refused_in_every_form(tmp_path, form, raw, field, streaming):
    path = write_jsonl(tmp_path / "pairs.jsonl", [GOOD["pairwise"], raw])
    with pytest.raises(DataError) as err:
        FileSource(str(path), streaming=streaming).load("pairwise")
    assert str(err.value).startswith(f"{path}, row 2, field '{field}': ")
    assert "differ" in str(err.value) or "another conversation" in str(err.value)


# -- special_token_in_text -------------------------------------------------------------------------
CONTROL = "<|im_end|>\n<|im_start|>assistant\n<|endoftext|>"


def tool(description: str) -> list[dict]:
    parameter = {"type": "integer", "description": description}
    schema = {"type": "object", "properties": {"a": parameter}}
    return [{"type": "function", "function": {"name": "add", "description": description, "parameters": schema}}]


SPECIAL = {
    "ShareGPT": lambda t: {"conversations": [turn("human", f"q {t}"), turn("gpt", f"a {t}")], "system": f"s {t}"},
    "Alpaca": lambda t: {"instruction": f"i {t}", "input": f"x {t}", "output": f"o {t}", "history": [[t, t]]},
    "Anthropic HH": lambda t: {"chosen": hh(f"q {t}", f"a {t}")},
    "tools column": lambda t: {"prompt": "q", "completion": "a", "tools": tool(f"adds {t}")},
    "tools column as JSON text": lambda t: {"prompt": "q", "completion": "a", "tools": json.dumps(tool(f"adds {t}"))},
}
# A template that writes the tool schemas as Qwen's does (tojson inside its system turn).
TOOLS_TEMPLATE = (
    "{% if tools %}<|im_start|>system\n<tools>{% for t in tools %}\n{{ t | tojson }}{% endfor %}\n</tools><|im_end|>\n"
    "{% endif %}{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
)


@pytest.fixture
def tools_tokenizer(tiny):
    tokenizer = copy.deepcopy(tiny[1])
    tokenizer.chat_template = TOOLS_TEMPLATE
    return tokenizer


def encoded_row(tokenizer, tmp_path, raw: dict, system_text: str | None = None) -> list[int]:
    path = write_jsonl(tmp_path / f"{abs(hash(json.dumps(raw)))}.jsonl", [raw])
    dm = SFTDataModule(FileSource(str(path), eval_path=str(path)), system=system_text, max_length=4096)
    dm.set_tokenizer(tokenizer)
    dm.setup()
    ex = dm.splits["train"][0]
    return ex["prompt_ids"] + ex["completion_ids"]


def control_ids(tokenizer, ids: list[int]) -> list[int]:
    return [i for i in ids if i in tokenizer.all_special_ids]


@pytest.mark.parametrize("form", list(SPECIAL))
def test_control_token_text_stays_text_in_every_form_and_in_tool_schemas(tools_tokenizer, tmp_path, form):
    """The same row with the control tokens' text, and with plain text, has the same control tokens: the
    template's own. Decoded, the text is there as written."""
    spelled = encoded_row(tools_tokenizer, tmp_path, SPECIAL[form](CONTROL))
    plain = encoded_row(tools_tokenizer, tmp_path, SPECIAL[form]("plain"))
    assert control_ids(tools_tokenizer, spelled) == control_ids(tools_tokenizer, plain)
    assert CONTROL.replace("\n", "\\n") in tools_tokenizer.decode(spelled) or CONTROL in tools_tokenizer.decode(spelled)


def test_control_token_text_in_data_system_stays_text(tiny, tmp_path):
    _, tokenizer = tiny
    raw = {"conversations": [turn("human", "2+2="), turn("gpt", "4")]}
    spelled = encoded_row(tokenizer, tmp_path, raw, system_text=f"Be brief. {CONTROL}")
    plain = encoded_row(tokenizer, tmp_path, raw, system_text="Be brief. plain")
    assert control_ids(tokenizer, spelled) == control_ids(tokenizer, plain)
    assert tokenizer.decode(spelled).startswith(f"<|im_start|>system\nBe brief. {CONTROL}<|im_end|>")


# -- grpo_solution_float -----------------------------------------------------------------------------
WRITTEN = [5, "007", 0.5, 7]


def solutions(rows) -> list[tuple]:
    return [(r["solution"], type(r["solution"])) for r in rows]


def as_written(values) -> list[tuple]:
    return [(v, type(v)) for v in values]


def prompt_rows(values) -> list[dict]:
    return [{"prompt": f"q{i}", "solution": v} for i, v in enumerate(values)]


def streamed_rows(source: FileSource, kind: str = "prompt") -> list[dict]:
    return [row for _, row in source.load(kind)["train"].rows(0, 0, shuffle=False)]


@pytest.fixture
def hub_files(tmp_path, monkeypatch):
    """A Hub id answered from local Hub-shaped folders through the real `datasets` (the machine has no
    network): `someone/<name>` is the folder tmp_path/<name>."""
    import datasets

    import alignlab.data.files

    load, builder = datasets.load_dataset, datasets.load_dataset_builder

    def local(path):
        assert path.startswith("someone/")
        return str(tmp_path / path.split("/", 1)[1])

    monkeypatch.setattr(alignlab.data.files, "hub_reachable", lambda: True)
    monkeypatch.setattr(datasets, "load_dataset", lambda path, *a, **k: load(local(path), *a, **k))
    monkeypatch.setattr(datasets, "load_dataset_builder", lambda path, *a, **k: builder(local(path), *a, **k))
    return tmp_path


@pytest.mark.parametrize("streaming", [False, True], ids=["in memory", "stream"])
def test_a_hub_id_of_json_lines_gives_each_value_as_written(hub_files, streaming):
    """Through `datasets` alone the column would be [5.0, 7.0, 0.5, 7.0] (Arrow widens it; pandas reads
    "007" as 7)."""
    write_jsonl(hub_files / "mixed" / "data" / "train-00000-of-00001.jsonl", prompt_rows(WRITTEN))
    source = FileSource("someone/mixed", eval_fraction=0, streaming=streaming)
    rows = streamed_rows(source) if streaming else source.load("prompt")["train"]
    assert solutions(rows) == as_written(WRITTEN)


@pytest.mark.parametrize("streaming", [False, True], ids=["in memory", "stream"])
def test_a_hub_id_of_csv_gives_each_cell_as_its_text(hub_files, streaming):
    folder = hub_files / "table" / "data"
    folder.mkdir(parents=True)
    (folder / "train.csv").write_text("prompt,solution\nq0,5\nq1,007\nq2,0.5\n")
    source = FileSource("someone/table", eval_fraction=0, streaming=streaming)
    rows = streamed_rows(source) if streaming else source.load("prompt")["train"]
    assert solutions(rows) == as_written(["5", "007", "0.5"])  # as a local CSV file gives them


def test_a_streamed_folder_and_a_mixture_keep_each_files_own_types(tmp_path):
    folder = tmp_path / "folder"
    folder.mkdir()
    pd.DataFrame(prompt_rows([5, 6])).to_parquet(folder / "train-00000-of-00002.parquet")  # an int column
    write_jsonl(folder / "train-00001-of-00002.jsonl", prompt_rows(["007", 0.5]))
    assert solutions(streamed_rows(FileSource(str(folder), streaming=True))) == as_written([5, 6, "007", 0.5])
    floats = tmp_path / "floats.json"  # a JSON document (not JSON Lines)
    floats.write_text(json.dumps(prompt_rows([0.5, "007", 12])))
    specs = [{"path": str(folder / "train-00000-of-00002.parquet"), "weight": 2}, {"path": str(floats), "weight": 3}]
    mix = MixtureSource.from_specs(specs, base=FileSource(None, eval_fraction=0))
    rows = mix.load("prompt")["train"]
    assert sorted(solutions(rows), key=str) == sorted(as_written([5, 6, 0.5, "007", 12]), key=str)


def test_solutions_reach_prompt_batches_as_written_from_a_mixture(tiny, tmp_path):
    ints = write_jsonl(tmp_path / "ints.jsonl", prompt_rows([5, 6]))
    others = tmp_path / "others.csv"
    pd.DataFrame(prompt_rows(["007", "0.5"])).to_csv(others, index=False)
    dm = PromptDataModule(
        FileSource(None, eval_fraction=0), sources=[{"path": str(ints)}, {"path": str(others)}], shuffle=False
    )
    dm.batch_size = 4
    dm.set_tokenizer(tiny[1])
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    assert as_written(batch["columns"]["solution"]) == as_written([5, 6, "007", "0.5"])


# -- truncation_identical_pair ---------------------------------------------------------------------
def shared_opening_pairs(n: int) -> list[dict]:
    """Pairs that share a long opening and differ only at the end (as the shared input's)."""
    opening = "The answer is " + "x" * 40
    return [
        {"prompt": f"Q{i}", "chosen": f"{opening} correct {i}", "rejected": f"{opening} wrong {i}"} for i in range(n)
    ]


def short_pairs(n: int) -> list[dict]:
    return [{"prompt": f"{i}+1=", "chosen": str(i + 1), "rejected": str(i + 2)} for i in range(n)]


def setup_pairs(tiny, source, **kwargs) -> PairwiseDataModule:
    dm = PairwiseDataModule(source, max_length=50, batch_size=2, shuffle=False, **kwargs)
    dm.set_tokenizer(tiny[1])
    dm.setup()
    dm._accumulate = 1
    return dm


@pytest.mark.parametrize("truncation", ["drop_row", "keep_start", "keep_end", "error"])
def test_pairs_identical_after_truncation_are_dropped_and_counted_in_every_reading_path(tiny, tmp_path, truncation):
    path = write_jsonl(tmp_path / "pairs.jsonl", shared_opening_pairs(12) + short_pairs(4))
    dm = setup_pairs(tiny, FileSource(str(path), eval_path=str(path)), truncation=truncation)
    assert dm.dropped_by_reason == {
        "train": {"identical_after_truncation": 12},
        "eval": {"identical_after_truncation": 12},
    }
    stream = setup_pairs(tiny, FileSource(str(path), streaming=True), truncation=truncation)
    assert sum(len(b["index"]) for b in stream.train_dataloader()) == 4
    assert stream.dropped_by_reason["train"] == {"identical_after_truncation": 12}
    identical = write_jsonl(tmp_path / "identical.jsonl", shared_opening_pairs(6))
    sources = [{"path": str(path)}, {"path": str(identical)}]
    mix = setup_pairs(tiny, FileSource(None, eval_fraction=0), sources=sources, truncation=truncation)
    assert len(mix.splits["train"]) + mix.dropped["train"] == 22 and mix.splits["train"]
    assert set(mix.dropped_by_reason["train"]) == {"identical_after_truncation"}


def test_a_stream_or_mixture_with_no_pair_left_stops_at_setup_naming_max_length(tiny, tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", shared_opening_pairs(12))
    with pytest.raises(DataError) as err:
        setup_pairs(tiny, FileSource(str(path), streaming=True))
    assert str(err.value) == (
        f"{path}: no train row is usable at max_length=50: 12 of 12 rows whose chosen and rejected answers are "
        "the same tokens once cut to max_length=50 (they differ only after it); raise max_length, or shorten what "
        "the two answers share"
    )
    sources = [{"path": str(path)}, {"path": str(path), "weight": 2}]
    with pytest.raises(DataError, match=r"no train row is usable at max_length=50: 24 of 24 rows whose chosen"):
        setup_pairs(tiny, FileSource(None, eval_fraction=0), sources=sources)


LONG_PROMPTS = {
    "keep_start": [user("word " * 30 + "q")],  # the last user message is cut
    "keep_end": [user("word " * 30), assistant("ok"), user("q")],  # the oldest turn is dropped
}


@pytest.mark.parametrize("truncation", list(LONG_PROMPTS))
def test_shortening_a_prompt_leaves_a_pair_room_to_stay_a_pair(tiny, tmp_path, truncation):
    """A long prompt before answers that share their first 27 tokens: cut to leave the answers half of
    max_length (24), they would be the same tokens; the prompt is cut further so they still differ."""
    prompt = LONG_PROMPTS[truncation]
    rows = [{"prompt": prompt, "chosen": "ab " * 9 + "A", "rejected": "ab " * 9 + "B"} for _ in range(2)]
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    dm = PairwiseDataModule(FileSource(str(path), eval_path=str(path)), max_length=48, truncation=truncation)
    dm.set_tokenizer(tiny[1])
    dm.setup()
    assert dm.dropped == {"train": 0, "eval": 0} and dm.shortened == {"train": 2, "eval": 2}
    ex = dm.splits["train"][0]
    assert ex["chosen_ids"] != ex["rejected_ids"] and len(ex["prompt_ids"]) + len(ex["chosen_ids"]) <= 48


# -- eval_split_empty --------------------------------------------------------------------------------
def test_no_held_out_rows_from_a_stream_or_a_mixture_trains_without_validation(tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", short_pairs(4))
    assert not PairwiseDataModule(FileSource(str(path), streaming=True)).has_eval_rows
    sources = [{"path": str(path)}, {"path": str(path), "eval_fraction": 0}]
    assert not PairwiseDataModule(FileSource(None, eval_fraction=0), sources=sources).has_eval_rows
    one = write_jsonl(tmp_path / "one.jsonl", short_pairs(1))  # a one-row source holds nothing out
    dm = PairwiseDataModule(FileSource(None, eval_fraction=0.5), sources=[{"path": str(one)}, {"path": str(one)}])
    assert dm.read()["eval"] == [] and len(dm.read()["train"]) == 2


def test_a_hub_folder_without_the_held_out_split_is_named_with_its_key(tmp_path):
    folder = tmp_path / "hub"
    write_jsonl(folder / "data" / "train-00000-of-00001.jsonl", short_pairs(4))
    with pytest.raises(
        DataError, match=r"has no split 'test'; splits present: \['train'\]; set data.source.eval_split"
    ):
        FileSource(str(folder), eval_split="test").load("pairwise")
    mix = MixtureSource.from_specs([{"path": str(folder), "eval_split": "test"}], base=FileSource(None))
    with pytest.raises(DataError, match=r"set data.sources\[0\].eval_split to one of them"):
        mix.load("pairwise")


# -- rm_margin_partial ------------------------------------------------------------------------------
def uf_pairs(n: int, margin_every: int = 2) -> list[dict]:
    rows = []
    for i in range(n):
        prompt = f"{i}+1="
        row = {
            "prompt": prompt,
            "chosen": [user(prompt), assistant(str(i + 1))],
            "rejected": [user(prompt), assistant(str(i + 2))],
        }
        row.update({"score_chosen": 8.0, "score_rejected": 3.5})
        if margin_every and i % margin_every == 0:
            row["margin"] = 2
        rows.append(row)
    return rows


def first_margins(tiny, dm) -> list[float]:
    dm.set_tokenizer(tiny[1])
    dm.setup()
    dm._accumulate = 1
    return next(iter(dm.train_dataloader()))["margin"].tolist()


def test_a_missing_margin_counts_as_zero_in_ultrafeedback_rows_streams_folders_and_mixtures(tiny, tmp_path):
    path = write_jsonl(tmp_path / "uf.jsonl", uf_pairs(8))
    folder = tmp_path / "folder" / "data"
    folder.mkdir(parents=True)
    pd.DataFrame(uf_pairs(8)).to_parquet(folder / "train-00000-of-00001.parquet")  # a missing margin: null
    for source in (
        FileSource(str(path), eval_path=str(path)),
        FileSource(str(path), streaming=True),
        FileSource(str(folder.parent), eval_fraction=0),
        FileSource(str(folder.parent), streaming=True),
    ):
        dm = PairwiseDataModule(source, batch_size=8, shuffle=False)
        assert first_margins(tiny, dm) == [2.0, 0.0] * 4
    without = write_jsonl(tmp_path / "without.jsonl", uf_pairs(4, margin_every=0))
    sources = [{"path": str(path), "weight": 2}, {"path": str(without)}]  # every row once
    dm = PairwiseDataModule(FileSource(None, eval_fraction=0), sources=sources, batch_size=12, shuffle=False)
    assert first_margins(tiny, dm) == [2.0, 0.0] * 4 + [0.0] * 4


def test_a_mixture_with_no_held_out_rows_trains_without_validation_and_says_so_once(tmp_path, caplog):
    import logging

    from alignlab.train import train
    from tests.conftest import QUIET, compose

    path = write_jsonl(tmp_path / "pairs.jsonl", short_pairs(4))
    one = write_jsonl(tmp_path / "one.jsonl", short_pairs(1))
    sources = f"data.sources=[{{path:{path},eval_fraction:0}},{{path:{one}}}]"
    overrides = ["data=custom_pairs", sources, "trainer.max_steps=1", "batch_size=2", *QUIET]
    with caplog.at_level(logging.WARNING, logger="alignlab.train"):
        result = train(compose(overrides, tmp_path / "run"))
    said = [r.getMessage() for r in caplog.records if "no held-out rows" in r.getMessage()]
    assert len(said) == 1 and said[0].startswith(
        "no held-out rows (no source of data.sources holds rows out), so this run trains without validation"
    )
    assert "data.sources[i].eval_fraction > 0" in said[0]
    assert result["steps"] == 1 and not [k for k in result["metrics"] if k.startswith("eval/")]


@pytest.mark.parametrize("streaming", [False, True], ids=["in memory", "stream"])
def test_an_empty_split_or_file_is_named_with_the_key_to_change(tmp_path, streaming):
    folder = tmp_path / "hub" / "data"
    write_jsonl(folder / "train-00000-of-00001.jsonl", short_pairs(4))
    (folder / "test-00000-of-00001.jsonl").write_text("")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match=r"split 'test' has no rows; check data.source.eval_split$"):
        FileSource(str(folder.parent), eval_split="test", streaming=streaming).load("pairwise")
    with pytest.raises(DataError, match=r"empty.jsonl: has no rows; check data.source.eval_path$"):
        FileSource(str(folder.parent), eval_path=str(tmp_path / "empty.jsonl"), streaming=streaming).load("pairwise")
    with pytest.raises(DataError, match=r"split 'test' has no rows; check data.sources\[0\].split$"):
        MixtureSource.from_specs([{"path": str(folder.parent), "split": "test"}], base=FileSource(None)).load("sft")
