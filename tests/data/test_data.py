"""The bundled task, file formats, canonical rows, tokenisation, truncation and collation."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from alignlab.data import PairwiseDataModule, SFTDataModule
from alignlab.data.arith import ArithTask
from alignlab.data.files import FileSource, read_rows
from alignlab.data.rows import KINDS, to_canonical
from alignlab.data.tokenize import encode_prompts
from alignlab.errors import DataError
from tests.conftest import ListSource

PAIRS = [("3+4=", "7", "8"), ("10+5=", "15", "16"), ("2+2=", "4", "5"), ("9+9=", "18", "81")]


def test_arith_is_deterministic_and_held_out_is_disjoint():
    a, b = ArithTask(seed=7).load("pairwise"), ArithTask(seed=7).load("pairwise")
    assert a == b
    assert ArithTask(seed=8).load("pairwise") != a
    train_prompts = {r["prompt"][0]["content"] for r in a["train"]}
    eval_prompts = {r["prompt"][0]["content"] for r in a["eval"]}
    assert len(a["eval"]) == 128 and len(a["train"]) == 2000
    assert not train_prompts & eval_prompts


@pytest.mark.parametrize("kind", KINDS)
def test_arith_rows_carry_the_right_solution(kind):
    rows = ArithTask(seed=0, n_train=50, n_eval=10).load(kind)["train"]
    for r in rows:
        x, y = r["prompt"][0]["content"].rstrip("=").split("+")
        assert r["solution"] == str(int(x) + int(y))
        if kind == "pairwise":
            assert r["chosen"] == r["solution"] != r["rejected"]
        if kind == "sft":
            assert r["completion"] == r["solution"]
        if kind == "labelled":
            assert (r["completion"] == r["solution"]) == r["label"]
    if kind == "labelled":
        assert sum(r["label"] for r in rows) == len(rows) // 2


def write_all_formats(tmp_path):
    """The same pairs in every accepted file layout."""
    conversational = [
        {
            "messages": [{"role": "user", "content": p}, {"role": "assistant", "content": c}],
            "rejected_response": r,
            "solution": c,
        }
        for p, c, r in PAIRS
    ]
    flat = [{"prompt": p, "chosen": c, "rejected": r, "solution": c} for p, c, r in PAIRS]
    flat_messages = [
        {
            "prompt": [{"role": "user", "content": p}],
            "chosen": [{"role": "assistant", "content": c}],
            "rejected": [{"role": "assistant", "content": r}],
            "solution": c,
        }
        for p, c, r in PAIRS
    ]
    files = {}
    files["conv.jsonl"] = tmp_path / "conv.jsonl"
    files["conv.jsonl"].write_text("\n".join(json.dumps(r) for r in conversational))
    files["flat.json"] = tmp_path / "flat.json"
    files["flat.json"].write_text(json.dumps(flat))
    files["flat.csv"] = tmp_path / "flat.csv"
    pd.DataFrame(flat).to_csv(files["flat.csv"], index=False)
    files["messages.parquet"] = tmp_path / "messages.parquet"
    pd.DataFrame(flat_messages).to_parquet(files["messages.parquet"])
    files["conv.csv"] = tmp_path / "conv.csv"
    pd.DataFrame([{**r, "messages": json.dumps(r["messages"])} for r in conversational]).to_csv(
        files["conv.csv"], index=False
    )
    return files


def test_every_file_format_gives_the_same_canonical_rows(tmp_path):
    expected = [
        {"prompt": [{"role": "user", "content": p}], "chosen": c, "rejected": r, "solution": c} for p, c, r in PAIRS
    ]
    for name, path in write_all_formats(tmp_path).items():
        rows = FileSource(str(path), eval_path=str(path)).load("pairwise")
        assert rows["train"] == expected, name
        assert rows["eval"] == expected, name


def test_pairwise_file_feeds_sft_and_prompt_kinds(tmp_path):
    path = write_all_formats(tmp_path)["conv.jsonl"]
    sft = FileSource(str(path), eval_fraction=0.25).load("sft")
    assert len(sft["train"]) == 3 and len(sft["eval"]) == 1
    assert {r["completion"] for r in sft["train"] + sft["eval"]} == {"7", "15", "4", "18"}
    prompts = FileSource(str(path), eval_fraction=0.0).load("prompt")["train"]
    assert prompts[0] == {"prompt": [{"role": "user", "content": "3+4="}], "rejected_response": "8", "solution": "7"}


def test_labelled_rows_accept_csv_booleans():
    row = to_canonical({"prompt": "1+1=", "completion": "2", "label": "True"}, "labelled", "f.csv", 3)
    assert row["label"] is True
    row = to_canonical(
        {"messages": [{"role": "user", "content": "1+1="}, {"role": "assistant", "content": "3"}], "label": False},
        "labelled",
        "f.jsonl",
        1,
    )
    assert row == {"prompt": [{"role": "user", "content": "1+1="}], "completion": "3", "label": False}


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


def system(text: str) -> dict:
    return {"role": "system", "content": text}


# (row, kind, field, message index, role): a blank message in each form rows.py reads
EMPTY_MESSAGES = [
    ({"messages": [user(""), assistant("4")]}, "sft", "messages", 0, "user"),
    ({"messages": [system(""), user("  "), assistant("4")], "label": True}, "labelled", "messages", 1, "user"),
    ({"messages": [user("2+2="), assistant(" ")], "rejected_response": "5"}, "pairwise", "messages", 1, "assistant"),
    ({"messages": [user("\n\t")]}, "prompt", "messages", 0, "user"),
    ({"prompt": [user("\n")]}, "prompt", "prompt", 0, "user"),
    ({"prompt": [system("s"), user("")], "completion": "x"}, "sft", "prompt", 1, "user"),
    ({"prompt": [user("q"), assistant(""), user("q2")], "completion": "x"}, "sft", "prompt", 1, "assistant"),
    ({"prompt": [user("")], "completion": "x", "label": False}, "labelled", "prompt", 0, "user"),
    ({"prompt": [user("2+2=")], "chosen": [assistant("")], "rejected": "5"}, "pairwise", "chosen", 0, "assistant"),
    ({"prompt": "2+2=", "chosen": "4", "rejected": [assistant("  ")]}, "pairwise", "rejected", 0, "assistant"),
    ({"chosen": [user(" "), assistant("4")], "rejected": [user(" "), assistant("5")]}, "pairwise", "chosen", 0, "user"),
    (
        {"messages": [user("2+2="), assistant("4")], "rejected_response": [assistant("")]},
        "pairwise",
        "rejected_response",
        0,
        "assistant",
    ),
    ({"messages": [{"role": "tool", "content": ""}, user("q"), assistant("a")]}, "sft", "messages", 0, "tool"),
]

# (pairwise row, field, message): answers that follow another conversation than the pair's prompt
PROMPT_MISMATCHES = [
    (  # TRL's implicit prompt: the conversations inside `chosen` and `rejected` differ
        {"chosen": [user("2+2="), assistant("4")], "rejected": [user("3+3="), assistant("5")]},
        "rejected",
        "answers another conversation than `chosen` (message 0 is user '3+3=' where `chosen` has user '2+2=')",
    ),
    (
        {"chosen": [system("A"), user("q"), assistant("4")], "rejected": [system("B"), user("q"), assistant("5")]},
        "rejected",
        "(message 0 is system 'B' where `chosen` has system 'A')",
    ),
    (  # a multi-turn chosen whose earlier turns the rejected answer lacks
        {"chosen": [user("q"), assistant("a"), user("q2"), assistant("b")], "rejected": [user("q"), assistant("c")]},
        "rejected",
        "(it has 1 prompt messages where `chosen` has 3)",
    ),
    (  # an explicit prompt and a conversation inside `rejected` that disagree
        {"prompt": "2+2=", "chosen": "4", "rejected": [user("3+3="), assistant("5")]},
        "rejected",
        "its prompt turns differ from `prompt` (message 0 is user '3+3=' where `prompt` has user '2+2=')",
    ),
    (
        {"prompt": [user("2+2=")], "chosen": [user("3+3="), assistant("6")], "rejected": [assistant("5")]},
        "chosen",
        "its prompt turns differ from `prompt`",
    ),
    (  # `chosen` continues the prompt with more turns, `rejected` answers the prompt itself
        {"prompt": "q", "chosen": [assistant("a"), user("q2"), assistant("b")], "rejected": "c"},
        "rejected",
        "(it has 1 prompt messages where `chosen` has 3)",
    ),
    (  # conversational form: `rejected_response` holding another conversation
        {"messages": [user("2+2="), assistant("4")], "rejected_response": [user("3+3="), assistant("5")]},
        "rejected_response",
        "its prompt turns differ from `messages` (message 0 is user '3+3=' where `messages` has user '2+2=')",
    ),
    (
        {"messages": [user("2+2="), assistant("4")], "rejected_response": [assistant("x"), user("y"), assistant("5")]},
        "rejected_response",
        "answers another conversation than `messages` (it has 3 prompt messages where `messages` has 1)",
    ),
]


@pytest.mark.parametrize(
    ("raw", "kind", "field", "message"),
    [
        ({"chosen": "7", "rejected": "8"}, "pairwise", "prompt", "missing"),
        ({"prompt": "3+4=", "rejected": "8"}, "pairwise", "chosen", "missing"),
        ({"prompt": "3+4=", "chosen": "7"}, "pairwise", "rejected", "missing"),
        ({"prompt": "3+4=", "chosen": "  ", "rejected": "8"}, "pairwise", "chosen", "empty"),
        ({"prompt": "3+4=", "chosen": "7", "rejected": "7"}, "pairwise", "rejected", "identical"),
        ({"prompt": 34, "chosen": "7", "rejected": "8"}, "pairwise", "prompt", "expected text or a list of messages"),
        ({"prompt": "3+4=", "chosen": 7, "rejected": "8"}, "pairwise", "chosen", "expected text or a list of messages"),
        (
            {"messages": [{"role": "user", "content": "3+4="}], "rejected_response": "8"},
            "pairwise",
            "messages",
            "assistant answer",
        ),
        ({"messages": [{"role": "robot", "content": "x"}]}, "prompt", "messages", "role 'robot'"),
        ({"messages": [{"role": "user", "content": 5}]}, "prompt", "messages", "content must be text"),
        ({"prompt": "1+1=", "completion": "2", "label": "yes"}, "labelled", "label", "true or false"),
        ({"prompt": "1+1=", "completion": "2", "label": 1}, "labelled", "label", "true or false"),
        ({"prompt": "1+1=", "completion": "2"}, "labelled", "label", "expected true or false, got None"),
        ({"prompt": "", "chosen": "7", "rejected": "8"}, "pairwise", "prompt", "prompt is empty"),
        ({"prompt": "3+4=", "chosen": "7", "rejected": "8", "margin": "big"}, "pairwise", "margin", "a number"),
        ({"prompt": "3+4=", "chosen": "7", "rejected": "8", "margin": "nan"}, "pairwise", "margin", "finite"),
        (
            {"prompt": [{"role": "assistant", "content": "hi"}], "completion": "2"},
            "sft",
            "prompt",
            "ends with an assistant message",
        ),
        ({"prompt": "3+4="}, "sft", "completion", "missing"),
        ({"completion": "7"}, "sft", "prompt", "missing"),
        ({"messages": []}, "prompt", "messages", "non-empty list of messages"),
        ({"messages": "not json"}, "sft", "messages", "not JSON"),
        ({"other": 1}, "prompt", "messages", "missing (give `messages` or `prompt`)"),
        # empty or blank message content, in every form (an empty system message is allowed)
        *[(raw, kind, field, f"message {i} ({role}) is empty") for raw, kind, field, i, role in EMPTY_MESSAGES],
        # the two answers of a pair, or an answer and `prompt`, following different conversations
        *[(raw, "pairwise", field, message) for raw, field, message in PROMPT_MISMATCHES],
        (
            {"prompt": "2+2=", "completion": [user("3+3="), assistant("6")]},
            "sft",
            "completion",
            "its prompt turns differ from `prompt` (message 0 is user '3+3=' where `prompt` has user '2+2=')",
        ),
        (
            {"prompt": "2+2=", "completion": [user("3+3="), assistant("6")], "label": True},
            "labelled",
            "completion",
            "its prompt turns differ from `prompt`",
        ),
        ({"prompt": "3+4=", "chosen": "7", "rejected": "8", "margin": [2]}, "pairwise", "margin", "a number"),
    ],
)
def test_bad_rows_name_file_row_and_field(raw, kind, field, message):
    with pytest.raises(DataError) as err:
        to_canonical(raw, kind, "data/train.jsonl", 12)
    text = str(err.value)
    assert text.startswith(f"data/train.jsonl, row 12, field '{field}'"), text
    assert message in text


def test_bad_row_in_a_file_is_reported_with_its_row_number(tmp_path):
    path = tmp_path / "pairs.jsonl"
    rows = [{"prompt": "1+1=", "chosen": "2", "rejected": "3"}, {"prompt": "1+2=", "chosen": "3", "rejected": "3"}]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    with pytest.raises(DataError, match=rf"{path}, row 2, field 'rejected': identical"):
        FileSource(str(path)).load("pairwise")


def test_unreadable_and_unknown_files_are_named(tmp_path):
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"prompt": "1+1=", "chosen": "2"\n')
    with pytest.raises(
        DataError, match=r"broken\.jsonl: line 1 is not valid JSON \(Expecting ',' delimiter at column 33\)"
    ):
        FileSource(str(broken)).load("pairwise")
    odd = tmp_path / "rows.txt"
    odd.write_text("hello")
    with pytest.raises(DataError, match="rows.txt: unknown file type"):
        FileSource(str(odd)).load("pairwise")


def test_pairwise_batch_layout_and_loss_mask(tiny):
    _, tokenizer = tiny
    rows = [
        to_canonical({"prompt": p, "chosen": c, "rejected": r, "solution": c}, "pairwise", "mem", i)
        for i, (p, c, r) in enumerate(PAIRS)
    ]
    dm = PairwiseDataModule(ListSource(rows), batch_size=4, eval_batch_size=4, max_length=64)
    dm.set_tokenizer(tokenizer)
    dm.setup()
    train = next(iter(dm.train_dataloader()))
    assert train["input_ids"].shape[0] == 8 and "prompt_input_ids" not in train
    order = train["index"].tolist()
    for half, answers in ((0, [PAIRS[i][1] for i in order]), (4, [PAIRS[i][2] for i in order])):
        for j, answer in enumerate(answers):
            ids, mask = train["input_ids"][half + j], train["loss_mask"][half + j]
            assert tokenizer.decode(ids[mask.bool()]) == answer + tokenizer.eos_token
            # right padding: real tokens first, then pad
            n = int(train["attention_mask"][half + j].sum())
            assert train["attention_mask"][half + j, :n].all() and not train["attention_mask"][half + j, n:].any()
    ev = next(iter(dm.val_dataloader()))
    assert ev["solution"] == [c for _, c, _ in PAIRS]
    first = ev["prompt_input_ids"][0][ev["prompt_attention_mask"][0].bool()]
    assert tokenizer.decode(first) == "<|im_start|>user\n3+4=<|im_end|>\n<|im_start|>assistant\n"
    assert ev["prompt_attention_mask"][:, -1].all()  # left padded: every prompt ends at the last column


def test_max_length_drops_long_prompts_and_truncates_answers(tiny):
    _, tokenizer = tiny
    prompt_len = len(encode_prompts(tokenizer, [[{"role": "user", "content": "3+4="}]])[0])
    rows = [
        {"prompt": [{"role": "user", "content": "3+4="}], "completion": "a long answer"},
        {"prompt": [{"role": "user", "content": "3+4=" + "x" * 50}], "completion": "7"},
    ]
    dm = SFTDataModule(ListSource(rows), batch_size=2, max_length=prompt_len + 3)
    dm.set_tokenizer(tokenizer)
    dm.setup()
    assert dm.dropped == {"train": 1, "eval": 1}
    (kept,) = dm.splits["train"]
    assert tokenizer.decode(kept["completion_ids"]) == "a l"  # truncated from the end to fit
    # with room for exactly one answer token the answer keeps one token, never zero
    dm = SFTDataModule(ListSource(rows[:1]), batch_size=2, max_length=prompt_len + 1)
    dm.set_tokenizer(tokenizer)
    dm.setup()
    assert len(dm.splits["train"][0]["completion_ids"]) == 1
    dm = SFTDataModule(ListSource(rows[:1]), batch_size=2, max_length=prompt_len)
    dm.set_tokenizer(tokenizer)
    with pytest.raises(DataError, match="no train row is usable at max_length"):
        dm.setup()


def test_unpair_turns_each_pair_into_a_desirable_and_an_undesirable_row(tiny):
    from alignlab.data import LabelledDataModule

    _, tokenizer = tiny
    dm = LabelledDataModule(ArithTask(n_train=40, n_eval=8), unpair=True, batch_size=4)
    rows = dm.rows()
    assert len(rows["train"]) == 80 and len(rows["eval"]) == 16
    first, second = rows["train"][:2]
    assert first["prompt"] == second["prompt"] and (first["label"], second["label"]) == (True, False)
    assert first["completion"] == first["solution"] != second["completion"]
    dm.set_tokenizer(tokenizer)
    dm.setup()
    assert sum(ex["label"] for ex in dm.splits["train"]) == 40


@pytest.mark.parametrize("name", ["data/train.jsonl", "train.csv", "./train", "~/nowhere/train", "/nowhere/pairs"])
def test_a_local_file_that_is_not_there_is_named_with_its_key_never_looked_up_on_the_hub(name, tmp_path, monkeypatch):
    import alignlab.data.files

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(alignlab.data.files, "hub_reachable", lambda: pytest.fail("looked up on the Hub"))
    with pytest.raises(DataError) as err:
        FileSource(name).load("pairwise")
    assert str(err.value) == f"{name}: no such file; check data.source.path (relative paths start from {tmp_path})"
    train = tmp_path / "train.jsonl"
    train.write_text(json.dumps({"prompt": "1+1=", "chosen": "2", "rejected": "3"}))
    with pytest.raises(DataError, match=r"^held\.jsonl: no such file; check data\.source\.eval_path"):
        FileSource(str(train), eval_path="held.jsonl").load("pairwise")


def test_a_name_neither_local_nor_reachable_on_the_hub_says_both(monkeypatch):
    import alignlab.data.files

    monkeypatch.setattr(alignlab.data.files, "hub_reachable", lambda: False)
    with pytest.raises(DataError) as err:
        FileSource("someone/pairs-v2").load("pairwise")
    assert str(err.value).startswith(
        "someone/pairs-v2: no such local file, and it cannot be looked up as a Hugging Face Hub data set because "
        "the Hub is not reachable (offline); check data.source.path"
    )


def test_a_missing_data_file_stops_the_run_before_anything_is_written(tmp_path):
    from alignlab.train import train
    from tests.conftest import QUIET, compose

    with pytest.raises(DataError, match="nope.jsonl: no such file; check data.source.path"):
        train(compose(["data=custom_pairs", f"data.source.path={tmp_path / 'nope.jsonl'}", *QUIET], tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_arith_desirable_fraction_sets_the_label_balance():
    rows = ArithTask(n_train=1000, n_eval=10, desirable_fraction=0.8).load("labelled")["train"]
    assert sum(r["label"] for r in rows) == 800


def test_pairwise_file_read_as_labelled_names_the_unpair_switch(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps({"prompt": "1+1=", "chosen": "2", "rejected": "3"}) + "\n")
    with pytest.raises(DataError, match=r"row 1, field 'label': missing: .*data.unpair=true"):
        FileSource(str(path)).load("labelled")


def test_not_an_object_row_is_named():
    with pytest.raises(DataError, match=r"^rows\.jsonl, row 3: expected an object per row, got list"):
        to_canonical([1, 2], "pairwise", "rows.jsonl", 3)


def bad_pairs_file(tmp_path) -> Path:
    rows = [
        {"prompt": "1+1=", "chosen": "2", "rejected": "3"},
        {"prompt": "1+2=", "chosen": "3", "rejected": "3"},  # identical
        {"prompt": "1+3=", "chosen": "4"},  # no rejected
        {"prompt": "1+4=", "chosen": "5", "rejected": "6"},
        {"prompt": "1+5=", "chosen": " ", "rejected": "7"},  # empty answer
    ]
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


def test_on_bad_row_skip_leaves_bad_rows_out_and_counts_them(tmp_path, caplog):
    path = bad_pairs_file(tmp_path)
    source = FileSource(str(path), eval_path=str(path))
    with caplog.at_level("WARNING"):
        rows = source.load("pairwise", on_bad_row="skip")
    assert [r["chosen"] for r in rows["train"]] == ["2", "5"]
    assert source.skipped == {"train": 3, "eval": 3}
    assert f"{path}: skipped 3 of 5 rows (data.on_bad_row=skip); first: {path}, row 2, field 'rejected'" in caplog.text
    with pytest.raises(DataError, match=r"row 2, field 'rejected': identical"):
        FileSource(str(path)).load("pairwise")  # the default stops at the first bad row


def test_on_bad_row_skip_with_no_good_row_left_is_an_error(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"prompt": "1+1=", "chosen": "2"}))
    with pytest.raises(
        DataError, match=r"bad\.jsonl: every one of its 1 rows is bad; the first: .*row 1, field 'rejected'"
    ):
        FileSource(str(path)).load("pairwise", on_bad_row="skip")


def test_training_with_skipped_rows_reports_them_and_bad_data_leaves_the_run_folder_alone(tmp_path):
    from alignlab.train import train
    from tests.conftest import QUIET, compose

    path = bad_pairs_file(tmp_path)
    data = ["data=custom_pairs", f"data.source.path={path}", f"data.source.eval_path={path}"]
    run = tmp_path / "run"
    result = train(compose([*data, "data.on_bad_row=skip", "trainer.max_steps=2", "batch_size=2", *QUIET], run))
    assert result["skipped_bad_rows"] == {"train": 3, "eval": 3}  # the held-out file is the same file
    assert json.loads((run / "summary.json").read_text())["skipped_bad_rows"] == {"train": 3, "eval": 3}

    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    with pytest.raises(DataError, match=r"row 2, field 'rejected'"):
        train(compose([*data, "resume=auto", "trainer.max_steps=4", *QUIET], run))
    after = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    assert after == before  # nothing the first run wrote was touched


@pytest.mark.parametrize(
    "raw",
    [
        {"chosen": [user("1+1="), assistant("2")], "rejected": [user("1+1="), assistant("3")]},
        {"chosen": [user("1+1="), assistant("2")], "rejected": "3"},  # implicit prompt, rejected as text
        {"prompt": "1+1=", "chosen": [user("1+1="), assistant("2")], "rejected": [user("1+1="), assistant("3")]},
        {"prompt": [user("1+1=")], "chosen": [assistant("2")], "rejected": [user("1+1="), assistant("3")]},
        {"messages": [user("1+1="), assistant("2")], "rejected_response": [user("1+1="), assistant("3")]},
        {"messages": [user("1+1="), assistant("2")], "rejected_response": [assistant("3")]},
    ],
)
def test_pair_forms_that_answer_one_prompt_give_it_once(raw):
    """A conversation inside an answer that repeats the prompt is the same prompt, taken once."""
    row = to_canonical(raw, "pairwise", "f.jsonl", 1)
    assert row == {"prompt": [user("1+1=")], "chosen": "2", "rejected": "3"}


def test_an_answer_may_continue_an_explicit_prompt_and_an_empty_system_message_is_allowed():
    raw = {
        "prompt": [system(""), user("q")],
        "chosen": [assistant("a"), user("q2"), assistant("b")],
        "rejected": [system(""), user("q"), assistant("a"), user("q2"), assistant("c")],
    }
    row = to_canonical(raw, "pairwise", "f.jsonl", 1)
    assert row["prompt"] == [system(""), user("q"), assistant("a"), user("q2")]
    assert (row["chosen"], row["rejected"]) == ("b", "c")
    sft = to_canonical({"messages": [system(" "), user("q"), assistant("a")]}, "sft", "f.jsonl", 1)
    assert sft["prompt"] == [system(" "), user("q")]
    assert to_canonical({"prompt": [system(""), user("q")]}, "prompt", "f.jsonl", 1)["prompt"] == [
        system(""),
        user("q"),
    ]


@pytest.mark.parametrize(("value", "expected"), [(2, 2.0), ("2.5", 2.5), (None, None), ("", None), ("  ", None)])
def test_an_optional_margin_is_a_float_or_absent(value, expected):
    """null (JSON, Parquet) and an empty CSV cell mean no margin: the row lacks the key, and counts as 0."""
    row = to_canonical({"prompt": "1+1=", "chosen": "2", "rejected": "3", "margin": value}, "pairwise", "f.csv", 1)
    assert row.get("margin") == expected and ("margin" in row) == (expected is not None)
    if expected is not None:
        assert type(row["margin"]) is float


# One row of each type a reward function may compare with, beside integer solutions: the file's
# values must come back as written, with no row widening another's type.
TYPED_ROWS = [
    {"prompt": "2+3=", "solution": 5},
    {"prompt": "1/2=", "solution": 0.5},
    {"prompt": "big", "solution": 12345678901234567891},
    {"prompt": "name", "solution": "five"},
    {"prompt": "yes?", "solution": True},
    {"prompt": "list", "solution": [1, 2]},
    {"prompt": "none", "solution": None},
    {"prompt": "absent"},
]


@pytest.mark.parametrize("layout", ["jsonl", "json list", "json data", "json rows", "json lines named .json"])
def test_json_files_keep_each_rows_own_types(tmp_path, layout):
    lines = "\n".join(json.dumps(r) for r in TYPED_ROWS)
    text = {
        "jsonl": lines,
        "json list": json.dumps(TYPED_ROWS, indent=1),
        "json data": json.dumps({"data": TYPED_ROWS}),
        "json rows": json.dumps({"rows": TYPED_ROWS}),
        "json lines named .json": lines + "\n\n",
    }[layout]
    path = tmp_path / ("rows.jsonl" if layout == "jsonl" else "rows.json")
    path.write_text(text)
    assert read_rows(str(path)) == TYPED_ROWS
    rows = FileSource(str(path), eval_fraction=0).load("prompt")["train"]
    assert [type(r.get("solution")) for r in rows] == [int, float, int, str, bool, list, type(None), type(None)]
    assert rows[0]["solution"] == 5 and "solution" not in rows[-1]


def test_csv_cells_and_parquet_columns_arrive_as_written(tmp_path):
    """CSV cells are text; a Parquet column has the type its writer gave it (an int column stays int,
    a float column stays float: pandas writes 5 beside 0.5 as 5.0), and a null is a missing value."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    csv_path = tmp_path / "rows.csv"
    csv_path.write_text('prompt,solution\n2+3=,5\n1/2=,0.5\n"a,b",\n')
    assert read_rows(str(csv_path)) == [
        {"prompt": "2+3=", "solution": "5"},
        {"prompt": "1/2=", "solution": "0.5"},
        {"prompt": "a,b", "solution": ""},
    ]
    parquet = tmp_path / "rows.parquet"
    table = pa.table({"prompt": ["2+3=", "1/2="], "solution": [5, 7], "score": [5.0, 0.5], "tag": ["x", None]})
    pq.write_table(table, parquet)
    rows = read_rows(str(parquet))
    assert rows == [
        {"prompt": "2+3=", "solution": 5, "score": 5.0, "tag": "x"},
        {"prompt": "1/2=", "solution": 7, "score": 0.5, "tag": None},
    ]
    assert [type(r["solution"]) for r in rows] == [int, int]
    widened = tmp_path / "widened.parquet"
    pd.DataFrame(TYPED_ROWS[:2]).to_parquet(widened)
    assert [r["solution"] for r in read_rows(str(widened))] == [5.0, 0.5]  # typed by the writer, not the reader


@pytest.mark.parametrize(
    ("answer", "solution", "matches"),
    [
        ("5", 5, True),
        (" 5\n", "5", True),
        ("5", 5.0, True),  # a Parquet float column: the number is the same
        ("5.0", "5", True),
        (".5", 0.5, True),
        ("-0", 0, True),
        ("12345678901234567890", 12345678901234567891, False),  # compared exactly, not as floats
        ("6", 5.0, False),
        ("five", "five", True),
        ("Five", "five", False),
        ("1/2", 0.5, False),  # a fraction is not read as a number
        ("nan", "NaN", False),  # not finite: only the same text matches
        ("5", None, False),  # a row without a solution
        ("1", True, False),
    ],
)
def test_answers_match_the_solution_as_text_or_as_the_same_number(answer, solution, matches):
    from alignlab.online.generation import exact_match, matches_solution
    from alignlab.online.rewards import exact_match as exact_match_reward

    assert matches_solution(answer, solution) is matches
    # the `exact_match` reward is this comparison (`accuracy` reads mathematics: tests/online/test_rewards.py)
    assert exact_match_reward([[user("q")]], [answer], solution=[solution]) == [float(matches)]
    assert exact_match([answer], [solution]).tolist() == [float(matches)]


def test_unreadable_json_names_the_file_and_line(tmp_path):
    bad_line = tmp_path / "rows.jsonl"
    bad_line.write_text('{"prompt": "a"}\n\n{"prompt": "b"}\n{"prompt": "c",}\n')
    with pytest.raises(
        DataError, match=r"rows\.jsonl: line 4 is not valid JSON \(Expecting property name .* at column 16\)"
    ):
        read_rows(str(bad_line))
    bad_file = tmp_path / "rows.json"
    bad_file.write_text('[{"prompt": "a"},\n {"prompt": }]')
    with pytest.raises(DataError, match=r"rows\.json: is not valid JSON \(Expecting value at line 2, column 13\)"):
        read_rows(str(bad_file))


def test_optional_numeric_columns_count_as_zero_and_columns_some_rows_lack_reach_the_batch(tiny):
    """The first row of a batch decides nothing: a column any row gives is the batch's."""
    from alignlab.data import PromptDataModule

    _, tokenizer = tiny
    rows = [
        {"prompt": [user("1+1=")], "chosen": "2", "rejected": "3"},
        {"prompt": [user("1+2=")], "chosen": "3", "rejected": "4", "margin": 2.0, "solution": "3"},
    ]
    dm = PairwiseDataModule(ListSource(rows), batch_size=2, eval_batch_size=2, shuffle=False)
    dm.set_tokenizer(tokenizer)
    dm.setup()
    train = next(iter(dm.train_dataloader()))
    assert train["margin"].tolist() == [0.0, 2.0]
    assert next(iter(dm.val_dataloader()))["solution"] == [None, "3"]
    sft = SFTDataModule(ListSource([{"prompt": [user("q")], "completion": "a", "margin": "x"}]), batch_size=1)
    sft.set_tokenizer(tokenizer)
    sft.setup()
    assert "margin" not in next(iter(sft.train_dataloader()))  # only pairwise batches carry numeric columns
    prompts = PromptDataModule(ListSource([{"prompt": [user("q")]}, {"prompt": [user("r")], "solution": 5}]))
    prompts.set_tokenizer(tokenizer)
    prompts.setup()
    batch = next(iter(prompts.val_dataloader()))
    assert batch["columns"] == {"solution": [None, 5]}


def identical_after_truncation_rows(tokenizer, max_length):
    """Pairs for PAIRS' prompts, answers sharing a long start and differing at the end: identical once cut
    to max_length except the first, which differs early; plus a row whose prompt alone is too long."""
    rows = [{"prompt": [user(p)], "chosen": "x" * 60 + c, "rejected": "x" * 60 + r, "solution": c} for p, c, r in PAIRS]
    rows[0] = {**rows[0], "chosen": "a" + rows[0]["chosen"]}
    rows.append({"prompt": [user("y" * 200)], "chosen": "1", "rejected": "2"})
    for r in rows[1:4]:  # the cut really falls inside the shared part
        prompt_len = len(encode_prompts(tokenizer, [r["prompt"]])[0])
        assert prompt_len + len(tokenizer(r["chosen"][:60])["input_ids"]) > max_length
    return rows


def test_pairs_that_truncation_makes_identical_are_dropped_and_counted_by_reason(tiny, caplog):
    _, tokenizer = tiny
    rows = identical_after_truncation_rows(tokenizer, 40)
    dm = PairwiseDataModule(ListSource(rows), batch_size=2, max_length=40)
    dm.set_tokenizer(tokenizer)
    with caplog.at_level("WARNING"):
        dm.setup()
    assert dm.dropped == {"train": 4, "eval": 4}
    assert dm.dropped_by_reason["train"] == {"identical_after_truncation": 3, "prompt_too_long": 1}
    assert [ex["index"] for ex in dm.splits["train"]] == [0]
    assert "train split: dropped 3 of 5 rows whose chosen and rejected answers are the same tokens" in caplog.text
    assert "train split: dropped 1 of 5 rows whose prompt alone does not fit max_length=40" in caplog.text
    # KTO reading the pairs unpaired: both rows of such a pair go (one text, labelled both ways)
    from alignlab.data import LabelledDataModule

    kto = LabelledDataModule(ListSource({"pairwise": rows}), unpair=True, batch_size=2, max_length=40)
    kto.set_tokenizer(tokenizer)
    kto.setup()
    assert kto.dropped_by_reason["train"] == {"identical_after_truncation": 6, "prompt_too_long": 2}
    assert [ex["index"] for ex in kto.splits["train"]] == [0, 1]
    # with room for the whole answers nothing but the long prompt is dropped
    dm = PairwiseDataModule(ListSource(rows), batch_size=2, max_length=128)
    dm.set_tokenizer(tokenizer)
    dm.setup()
    assert dm.dropped_by_reason["train"] == {"prompt_too_long": 1}


def test_no_pair_left_after_truncation_is_an_error_naming_max_length(tiny):
    _, tokenizer = tiny
    rows = identical_after_truncation_rows(tokenizer, 40)[1:4]
    dm = PairwiseDataModule(ListSource(rows), batch_size=2, max_length=40)
    dm.set_tokenizer(tokenizer)
    with pytest.raises(DataError) as err:
        dm.setup()
    assert str(err.value) == (
        "ListSource: no train row is usable at max_length=40: 3 of 3 rows whose chosen and rejected answers are "
        "the same tokens once cut to max_length=40 (they differ only after it); raise max_length, or shorten what "
        "the two answers share"
    )


def test_values_added_to_rows_travel_with_every_batch_and_the_data_knows_no_prefix(tiny):
    """add_row_values is how numbers computed from the rows (e.g. reference log-probs) come back: any
    name, in scoring batches' order, carried as float32 [rows] tensors; a key only written into a row
    is not. The data layer names no algorithm's values."""
    import re

    import torch

    import alignlab.data

    _, tokenizer = tiny
    rows = [
        to_canonical({"prompt": p, "chosen": c * (i + 1), "rejected": r, "solution": c}, "pairwise", "mem", i)
        for i, (p, c, r) in enumerate(PAIRS)
    ]
    dm = PairwiseDataModule(ListSource(rows), batch_size=3, eval_batch_size=4, max_length=64, shuffle=False)
    dm.set_tokenizer(tokenizer)
    dm.setup()
    batches = dm.scoring_batches()
    for split in ("train", "eval"):  # every row once, shortest first, batch_size rows at a time
        positions = [i for s, chunk in batches if s == split for i in chunk]
        assert sorted(positions) == list(range(4))
        assert [dm.length(dm.splits[split][i]) for i in positions] == sorted(dm.length(ex) for ex in dm.splits[split])
    assert [len(chunk) for _, chunk in batches] == [3, 1, 3, 1]
    for split, chunk in batches:
        batch = dm.collate_rows(split, chunk)
        assert batch["index"].tolist() == chunk and "prompt_input_ids" not in batch
        dm.add_row_values(split, chunk, {"score": batch["index"].double() / 3, "other": [1.5] * len(chunk)})
    dm.splits["train"][0]["ref_unlisted"] = 7.0  # written into a row, not given: not the batch's
    train = next(iter(dm.train_dataloader()))
    assert train["score"].dtype == torch.float32 and "ref_unlisted" not in train
    assert torch.equal(train["score"], (train["index"].double() / 3).float())
    assert train["other"].tolist() == [1.5, 1.5, 1.5]
    assert next(iter(dm.val_dataloader()))["score"].tolist() == torch.tensor([0, 1 / 3, 2 / 3, 1]).tolist()
    with pytest.raises(ValueError, match="score: 1 values for 2 rows"):
        dm.add_row_values("train", [0, 1], {"score": [0.0]})
    data = Path(alignlab.data.__file__).parent
    assert not [p.name for p in data.glob("*.py") if re.search(r"\bref_", p.read_text())]
