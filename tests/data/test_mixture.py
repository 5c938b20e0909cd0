"""Mixtures (`data.sources`): weights become row counts as documented, the draw is fixed by the seed,
each source keeps its own column map and held-out rows, and bad specs name their key."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from alignlab.data import PairwiseDataModule
from alignlab.data.files import FileSource, draw_rows
from alignlab.data.mixture import MixtureSource, check_sources, mixture_counts
from alignlab.errors import ConfigError, DataError
from tests.data.folders import pairs, prompts_of, write_jsonl, write_uf_folder


def reference_counts(sizes, weights):
    """The documented rule written out: N = Σn, quota wᵢ/Σw·N, floors, then +1 to the largest remainders."""
    n = sum(sizes)
    quota = [w * n / sum(weights) for w in weights]
    counts = [int(q // 1) for q in quota]
    rest = sorted(range(len(sizes)), key=lambda i: (counts[i] - quota[i], i))[: n - sum(counts)]
    return [c + (i in rest) for i, c in enumerate(counts)]


def test_mixture_counts_on_hand_checked_numbers():
    assert mixture_counts([100, 100], [1, 1]) == [100, 100]
    assert mixture_counts([100, 100], [3, 1]) == [150, 50]  # the second source is sampled, the first repeated
    assert mixture_counts([10, 5], [1, 1]) == [8, 7]  # 7.5 each: the tie goes to the earlier source
    assert mixture_counts([7, 3, 2], [0.5, 0.25, 0.25]) == [6, 3, 3]


def test_mixture_counts_follow_the_documented_rule_on_random_sizes_and_weights():
    rng = random.Random(7)
    for _ in range(200):
        k = rng.randint(1, 5)
        sizes = [rng.randint(1, 500) for _ in range(k)]
        weights = [rng.uniform(0.01, 10) for _ in range(k)]
        counts = mixture_counts(sizes, weights)
        assert counts == reference_counts(sizes, weights)
        assert sum(counts) == sum(sizes)
        for c, w in zip(counts, weights):
            assert abs(c - w / sum(weights) * sum(sizes)) < 1


@pytest.fixture
def two_files(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", pairs("a", 40))
    b = write_jsonl(tmp_path / "b.jsonl", [{"q": f"b{i}", "good": "yes", "bad": "no"} for i in range(10)])
    return a, b


def mix(a, b, weights=(3, 1), seed=0, **base):
    base = FileSource(None, eval_fraction=0, split_seed=seed, **base)
    specs = [
        {"path": str(a), "weight": weights[0]},
        {"path": str(b), "weight": weights[1], "columns": {"q": "prompt", "good": "chosen", "bad": "rejected"}},
    ]
    return MixtureSource.from_specs(specs, base)


def test_a_mix_has_the_weighted_shares_each_source_with_its_own_column_map(two_files):
    a, b = two_files
    source = mix(a, b)
    rows = source.load("pairwise")["train"]
    assert source.counts == [38, 12]  # 50 rows, 3:1
    got = Counter(p[0] for p in prompts_of(rows))
    assert got == {"a": 38, "b": 12}
    # a: 38 of 40 without replacement; b: 12 of 10, so every row once and 2 twice
    a_rows = [p for p in prompts_of(rows) if p[0] == "a"]
    assert len(set(a_rows)) == 38
    b_counts = Counter(p for p in prompts_of(rows) if p[0] == "b")
    assert sorted(b_counts.values()) == [1] * 8 + [2] * 2
    assert prompts_of(rows) == prompts_of(mix(a, b).load("pairwise")["train"])  # the same draw every time
    assert prompts_of(rows) != prompts_of(mix(a, b, seed=1).load("pairwise")["train"])
    assert prompts_of(rows)[:38] == a_rows  # the sources in the order listed (data.shuffle=false trains so)


def test_the_draw_is_the_documented_one(two_files):
    """Each source's rows are those `draw_rows` gives from one generator seeded by split_seed, in order."""
    a, b = two_files
    rng = random.Random("0:mix")
    expected = [f"a{i}" for i in draw_rows(40, 38, rng)] + [f"b{i}" for i in draw_rows(10, 12, rng)]
    assert prompts_of(mix(a, b).load("pairwise")["train"]) == expected


def test_repeated_rows_are_separate_rows_that_still_name_their_file_row(two_files):
    a, b = two_files
    source = mix(a, b, weights=(1, 3))
    rows = source.load("pairwise")["train"]
    b_rows = [r for r in rows if prompts_of([r])[0].startswith("b")]
    assert len({id(r) for r in rows}) == len(rows)
    first = next(r for r in b_rows if prompts_of([r])[0] == "b0")
    assert all(source.origin(r) == (str(b), 1, "prompt") for r in b_rows if prompts_of([r])[0] == "b0")
    assert source.origin(first) == (str(b), 1, "prompt")


def test_held_out_rows_are_each_sources_own_and_a_mix_can_hold_a_folder(tmp_path, two_files):
    a, _ = two_files
    folder = write_uf_folder(tmp_path / "uf", n_train=20, n_test=4)
    base = FileSource(None, eval_fraction=0.25)
    specs = [{"path": str(a)}, {"path": str(folder), "split": "train_prefs", "eval_split": "test_prefs", "weight": 1}]
    rows = MixtureSource.from_specs(specs, base).load("pairwise")
    assert len(rows["eval"]) == 10 + 4  # a quarter of a, and uf's test_prefs
    assert len(rows["train"]) == 30 + 20


def test_a_data_module_mixes_through_data_sources(two_files):
    a, b = two_files
    specs = [
        {"path": str(a), "weight": 1},
        {"path": str(b), "columns": {"q": "prompt", "good": "chosen", "bad": "rejected"}},
    ]
    dm = PairwiseDataModule(FileSource(None, eval_fraction=0), sources=specs)
    assert Counter(p[0] for p in prompts_of(dm.read()["train"])) == {"a": 25, "b": 25}


@pytest.mark.parametrize(
    "sources, message",
    [
        ([], r"data\.sources must be a non-empty list"),
        ("a.jsonl", r"data\.sources must be a non-empty list"),
        ([{"path": "a.jsonl", "weight": 0}], r"data\.sources\[0\]\.weight must be a finite number > 0 .*got 0"),
        ([{"path": "a"}, {"path": "b", "weight": -1}], r"data\.sources\[1\]\.weight must be a finite number > 0"),
        ([{"path": "a", "weight": "heavy"}], r"data\.sources\[0\]\.weight must be a finite number > 0"),
        ([{"path": "a", "weight": float("inf")}], r"data\.sources\[0\]\.weight must be a finite number"),
        ([{"weight": 1}], r"data\.sources\[0\]\.path is not set"),
        ([{"path": "a", "wieght": 2}], r"data\.sources\[0\] has key\(s\) \['wieght'\] it does not take"),
        ([{"path": "a", "columns": ["q"]}], r"data\.sources\[0\]\.columns must map column names"),
        ([3], r"data\.sources\[0\] must be a data set spec"),
    ],
)
def test_bad_specs_name_their_key(sources, message):
    with pytest.raises(ConfigError, match=message):
        check_sources(sources)


def test_a_spec_that_is_a_bare_path_weighs_one(two_files):
    a, _ = two_files
    assert check_sources([str(a)]) == [{"path": str(a)}]


def test_a_source_errors_name_its_place_in_the_list(tmp_path, two_files):
    a, _ = two_files
    folder = write_uf_folder(tmp_path / "uf")
    base = FileSource(None, eval_fraction=0)
    specs = [{"path": str(a)}, {"path": str(folder), "split": "train_sft"}]
    with pytest.raises(DataError, match=r"has no split 'train_sft'; .*set data\.sources\[1\]\.split"):
        MixtureSource.from_specs(specs, base).load("pairwise")
    with pytest.raises(DataError, match=r"nope\.jsonl: no such file; check data\.sources\[1\]\.path"):
        MixtureSource.from_specs([{"path": str(a)}, {"path": str(tmp_path / "nope.jsonl")}], base).load("pairwise")
    with pytest.raises(DataError, match=r"gets no row of the 41-row mix at data\.sources\[1\]\.weight=0\.001"):
        one = write_jsonl(tmp_path / "one.jsonl", pairs("o", 1))
        MixtureSource.from_specs([{"path": str(a)}, {"path": str(one), "weight": 0.001}], base).load("pairwise")


def test_a_mixture_needs_a_file_data_config():
    from alignlab.data.arith import ArithTask

    with pytest.raises(ConfigError, match=r"data\.sources mixes files.*data=custom_pairs"):
        PairwiseDataModule(ArithTask(), sources=[{"path": "a.jsonl"}])


def test_a_mixture_from_the_command_line_trains_and_bad_weights_stop_before_anything_is_written(tmp_path, two_files):
    from alignlab.train import train
    from tests.conftest import QUIET, compose

    a, b = two_files
    columns = "{q: prompt, good: chosen, bad: rejected}"
    mixed = f"data.sources=[{{path: '{a}', weight: 3}}, {{path: '{b}', columns: {columns}}}]"
    run = tmp_path / "run"
    with pytest.raises(ConfigError, match=r"data\.sources\[1\]\.weight must be a finite number > 0"):
        bad = f"data.sources=[{{path: '{a}'}}, {{path: '{b}', weight: 0}}]"
        train(compose(["data=custom_pairs", bad, *QUIET], run))
    assert not run.exists()
    result = train(compose(["data=custom_pairs", mixed, "trainer.max_steps=2", "batch_size=4", *QUIET], run))
    assert result["steps"] == 2


def test_columns_for_every_source_apply_under_each_specs_own(two_files, tmp_path):
    """`columns` given to load (data.columns) renames in every source; a spec's own map wins for its names."""
    a, b = two_files
    c = write_jsonl(
        tmp_path / "c.jsonl", [{"q": f"c{i}", "good": "yes", "bad": "no", "chosen": "x"} for i in range(10)]
    )
    base = FileSource(None, eval_fraction=0)
    specs = [{"path": str(b)}, {"path": str(c), "columns": {"chosen": "chosen", "good": "unused"}}]
    rows = MixtureSource.from_specs(specs, base).load(
        "pairwise", columns={"q": "prompt", "good": "chosen", "bad": "rejected"}
    )
    by_source = {p[0]: r["chosen"] for r, p in zip(rows["train"], prompts_of(rows["train"]))}
    assert by_source == {"b": "yes", "c": "x"}
