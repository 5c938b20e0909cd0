"""Data set specs: files, folders laid out as Hub data set repositories, Hub ids (through a mocked
`datasets.load_dataset`), subsets, splits, sample sizes and column maps; each error names its key."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import yaml

from alignlab.data.files import FileSource, draw_rows, file_split
from alignlab.errors import ConfigError, DataError
from tests.data.folders import pairs, prompts_of, write_jsonl, write_uf_folder


def test_file_split_reads_the_hub_file_names():
    assert file_split(Path("data/train_prefs-00000-of-00001.parquet")) == "train_prefs"
    assert file_split(Path("test.jsonl")) == "test"
    assert file_split(Path("sub/train-00003.jsonl")) == "train"
    assert file_split(Path("default/validation/0000.parquet")) == "validation"  # the Parquet conversion layout


def test_an_ultrafeedback_shaped_folder_gives_its_splits_in_shard_order_with_score_columns(tmp_path):
    folder = write_uf_folder(tmp_path / "ultrafeedback")
    rows = FileSource(str(folder), split="train_prefs", eval_split="test_prefs").load("pairwise")
    assert prompts_of(rows["train"]) == [f"{i}+{i + 1}=" for i in range(30)]  # shard 0 then shard 1
    assert prompts_of(rows["eval"]) == [f"{100 + i}+1=" for i in range(6)]
    first = rows["train"][0]
    assert (first["chosen"], first["rejected"]) == ("1", "2")
    assert (first["score_chosen"], first["score_rejected"], first["prompt_id"]) == (8.0, 3.5, "id-0-1")
    # without a held-out split, the seeded fraction is cut from train_prefs as from a file
    held = FileSource(str(folder), split="train_prefs", eval_fraction=0.2).load("pairwise")
    assert (len(held["train"]), len(held["eval"])) == (24, 6)


def test_an_unknown_split_lists_the_splits_present_and_names_its_key(tmp_path):
    folder = write_uf_folder(tmp_path / "uf")
    with pytest.raises(DataError) as err:
        FileSource(str(folder)).load("pairwise")  # the default split, train, is not there
    assert str(err.value) == (
        f"{folder}: has no split 'train'; splits present: ['test_prefs', 'train_prefs']; set data.source.split to one "
        "of them"
    )
    with pytest.raises(DataError, match=r"has no split 'test'; splits present: .*set data\.source\.eval_split"):
        FileSource(str(folder), split="train_prefs", eval_split="test").load("pairwise")


def test_subsets_are_subfolders_and_one_must_be_chosen(tmp_path):
    folder = tmp_path / "mix"
    write_jsonl(folder / "easy" / "train-00000-of-00002.jsonl", pairs("e", 3))
    write_jsonl(folder / "easy" / "train-00001-of-00002.jsonl", pairs("f", 2))
    write_jsonl(folder / "hard" / "train.jsonl", pairs("h", 4))
    write_jsonl(folder / "hard" / "test.jsonl", pairs("t", 2))
    with pytest.raises(DataError) as err:
        FileSource(str(folder), eval_fraction=0).load("pairwise")
    assert str(err.value) == (
        f"{folder}: holds split 'train' in several subfolders (easy, hard): they are subsets of the data set; choose "
        "one with data.source.subset"
    )
    easy = FileSource(str(folder), subset="easy", eval_fraction=0).load("pairwise")
    assert prompts_of(easy["train"]) == ["e0", "e1", "e2", "f0", "f1"]
    hard = FileSource(str(folder), name="hard", eval_split="test").load("pairwise")  # `name`, as datasets says it
    assert (prompts_of(hard["train"]), prompts_of(hard["eval"])) == (["h0", "h1", "h2", "h3"], ["t0", "t1"])
    with pytest.raises(DataError) as err:
        FileSource(str(folder), subset="medium").load("pairwise")
    assert str(err.value) == (
        f"{folder}: has no subset 'medium' (a subfolder with data files); subsets present: ['easy', 'hard']; check "
        "data.source.subset"
    )
    with pytest.raises(ConfigError, match=r"data\.source\.subset='easy' and data\.source\.name='hard' disagree"):
        FileSource(str(folder), subset="easy", name="hard")


def test_a_folder_without_data_files_and_a_missing_folder_are_named(tmp_path, monkeypatch):
    import alignlab.data.files

    empty = tmp_path / "empty"
    (empty / ".cache").mkdir(parents=True)
    write_jsonl(empty / ".cache" / "train.jsonl", pairs("x", 2))  # hidden folders are not data
    (empty / "README.md").write_text("nothing here")
    with pytest.raises(
        DataError, match=r"empty: holds no data files \(\.csv, \.json, \.jsonl, \.parquet, at any depth"
    ):
        FileSource(str(empty)).load("pairwise")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(alignlab.data.files, "hub_reachable", lambda: pytest.fail("looked up on the Hub"))
    with pytest.raises(DataError, match=r"^\./nowhere/: no such file; check data\.source\.path"):
        FileSource("./nowhere/#5").load("pairwise")  # the sample suffix is not part of the name looked for


def test_eval_split_on_a_single_file_says_to_give_eval_path(tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", pairs("p", 4))
    with pytest.raises(
        ConfigError, match=r"data\.source\.eval_split='test' needs a folder or a Hub data set.*eval_path"
    ):
        FileSource(str(path), eval_split="test").load("pairwise")


def test_draw_rows_samples_without_replacement_up_to_the_size_and_repeats_evenly_beyond():
    rng = random.Random(0)
    sample = draw_rows(10, 4, rng)
    assert len(set(sample)) == 4 and sample == sorted(sample)
    more = draw_rows(10, 25, random.Random(0))
    counts = [more.count(i) for i in range(10)]
    assert sorted(counts) == [2] * 5 + [3] * 5  # two whole passes, then 5 rows without replacement
    assert draw_rows(3, 3, rng) == [0, 1, 2]


def test_sample_size_by_suffix_or_max_rows_is_the_same_seeded_sample(tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", pairs("p", 50))
    by_suffix = FileSource(f"{path}#8", eval_fraction=0).load("pairwise")["train"]
    by_key = FileSource(str(path), max_rows=8, eval_fraction=0).load("pairwise")["train"]
    assert prompts_of(by_suffix) == prompts_of(by_key)
    taken = [int(p[1:]) for p in prompts_of(by_key)]
    assert len(set(taken)) == 8 and taken == sorted(taken)  # without replacement, in file order
    other = FileSource(str(path), max_rows=8, split_seed=1, eval_fraction=0).load("pairwise")["train"]
    assert prompts_of(other) != prompts_of(by_key)
    # the held-out fraction is cut from the sample
    split = FileSource(f"{path}#20", eval_fraction=0.25).load("pairwise")
    assert (len(split["train"]), len(split["eval"])) == (15, 5)
    assert set(prompts_of(split["train"] + split["eval"])) < set(prompts_of(by_key) + [f"p{i}" for i in range(50)])


def test_a_sample_larger_than_the_data_repeats_every_row(tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", pairs("p", 3))
    rows = FileSource(f"{path}#7", eval_fraction=0).load("pairwise")["train"]
    got = prompts_of(rows)
    assert len(got) == 7 and {got.count(p) for p in ("p0", "p1", "p2")} <= {2, 3}


@pytest.mark.parametrize(
    "path, max_rows, message",
    [
        ("rows.jsonl#5", 6, r"data\.source\.path ends in #5 but data\.source\.max_rows=6; give one of them"),
        ("rows.jsonl", 0, r"data\.source\.max_rows \(or #N on the path\) must be a whole number >= 1, got 0; give"),
        (
            "rows.jsonl#0",
            None,
            r"data\.source\.max_rows \(or #N on the path\) must be a whole number >= 1, got 0; give",
        ),
        ("rows.jsonl", 2.5, r"must be a whole number >= 1, got 2\.5"),
        ("rows.jsonl", "many", r"must be a whole number >= 1, got 'many'"),
    ],
)
def test_bad_sample_sizes_name_the_key(path, max_rows, message):
    with pytest.raises(ConfigError, match=message):
        FileSource(path, max_rows=max_rows)


def test_a_local_name_ending_in_hash_digits_is_a_folder_not_a_sample(tmp_path):
    write_jsonl(tmp_path / "pairs#2" / "train.jsonl", pairs("p", 5))
    assert len(FileSource(str(tmp_path / "pairs#2"), eval_fraction=0).load("pairwise")["train"]) == 5


def test_columns_rename_before_conversion_and_unknown_names_are_an_error(tmp_path):
    rows = [{"question": f"{i}+1=", "good": str(i + 1), "bad": str(i + 2)} for i in range(4)]
    path = write_jsonl(tmp_path / "qa.jsonl", rows)
    source = FileSource(str(path), eval_fraction=0, columns={"question": "prompt", "good": "chosen", "bad": "rejected"})
    got = source.load("pairwise")["train"]
    assert prompts_of(got) == ["0+1=", "1+1=", "2+1=", "3+1="] and got[0]["chosen"] == "1"
    source = FileSource(str(path), eval_fraction=0, columns={"question": "prompt", "answer": "chosen"})
    with pytest.raises(
        DataError,
        match=r"data\.source\.columns names \['answer'\] but no row of the file has such a column; its columns are",
    ):
        source.load("pairwise")


def test_a_hub_id_goes_to_datasets_with_its_subset_and_split(hub):
    rows = FileSource("someone/ultrafeedback#5", split="train_prefs", eval_split="test_prefs").load("pairwise")
    assert hub == [
        {"path": "someone/ultrafeedback", "name": None, "split": "train_prefs", "streaming": False},
        {"path": "someone/ultrafeedback", "name": None, "split": "test_prefs", "streaming": False},
    ]
    assert (len(rows["train"]), len(rows["eval"])) == (5, 6)
    assert rows["train"][0]["score_chosen"] == 8.0


def test_a_hub_split_or_subset_that_does_not_exist_is_named_with_its_key(hub):
    with pytest.raises(DataError) as err:
        FileSource("someone/ultrafeedback", split="train_gen").load("pairwise")
    assert str(err.value) == (
        "someone/ultrafeedback: Unknown split \"train_gen\". Should be one of ['test_prefs', 'train_prefs']; check "
        "data.source.split"
    )
    with pytest.raises(
        DataError, match=r"BuilderConfig 'nope' not found\. Available: \['default'\]; check data\.source\.subset"
    ):
        FileSource("someone/ultrafeedback", subset="nope", split="train_prefs").load("pairwise")
    assert hub[-1]["name"] == "nope"


def test_an_ultrafeedback_shaped_folder_trains_dpo_end_to_end(tmp_path):
    from alignlab.train import train
    from tests.conftest import QUIET, compose

    folder = write_uf_folder(tmp_path / "ultrafeedback", n_train=16, n_test=4)
    data = ["data=custom_pairs", f"data.source.path={folder}", "data.source.split=train_prefs"]
    overrides = [*data, "data.source.eval_split=test_prefs", "trainer.max_steps=2", "batch_size=4", *QUIET]
    result = train(compose(overrides, tmp_path / "run"))
    assert result["steps"] == 2 and result["dropped_rows"] == {"train": 0, "eval": 0}
    assert "eval/rewards/accuracies" in result["metrics"]  # the held-out split was validated on
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["max_length"] == "auto" and saved["data"]["max_length"] in (64, 128)  # the length auto chose
