"""The bundled task, file formats, canonical rows, tokenisation, truncation and collation."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from alignlab.data import PairwiseDataModule, SFTDataModule
from alignlab.data.arith import ArithTask
from alignlab.data.files import FileSource
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
    with pytest.raises(DataError, match="broken.jsonl: could not be read"):
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
    with pytest.raises(DataError, match="no train row fits max_length"):
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
    import alignlab.models.loading

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(alignlab.models.loading, "hub_reachable", lambda: pytest.fail("looked up on the Hub"))
    with pytest.raises(DataError) as err:
        FileSource(name).load("pairwise")
    assert str(err.value) == f"{name}: no such file; check data.source.path (relative paths start from {tmp_path})"
    train = tmp_path / "train.jsonl"
    train.write_text(json.dumps({"prompt": "1+1=", "chosen": "2", "rejected": "3"}))
    with pytest.raises(DataError, match=r"^held\.jsonl: no such file; check data\.source\.eval_path"):
        FileSource(str(train), eval_path="held.jsonl").load("pairwise")


def test_a_name_neither_local_nor_reachable_on_the_hub_says_both(monkeypatch):
    import alignlab.models.loading

    monkeypatch.setattr(alignlab.models.loading, "hub_reachable", lambda: False)
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
