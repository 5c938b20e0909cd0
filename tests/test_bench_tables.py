"""experiments/bench_trl.py's tables: the ratios, the markdown and the rewrite between the docs' markers,
on a made-up report (no training)."""

from __future__ import annotations

import importlib.util

import pytest

from tests.conftest import ROOT

spec = importlib.util.spec_from_file_location("bench_trl", ROOT / "experiments" / "bench_trl.py")
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)


def run(algorithm: str, setting: str, tokens: float, memory: float, **extra) -> dict:
    return {
        "model": "30M",
        "parameters": 30_000_000,
        "algorithm": algorithm,
        "trainer": "trl" if setting.startswith("TRL") else "alignlab",
        "setting": setting,
        "tokens_per_s": tokens,
        "seconds_per_step": 2.0,
        "seconds_total": 20.0,
        "peak_memory_mb": memory,
        "first_losses": [0.69314, 0.5],
        "matmul_share": 0.25,
        **extra,
    }


REPORT = {
    "command": "python experiments/bench_trl.py --write-docs",
    "date": "2026-11-30",
    "machine": "Some CPU, 2 cores",
    "device": "cpu",
    "matmul_flops": 3.02e11,
    "trl_version": "1.16.0",
    "steps": 20,
    "results": [
        run("dpo", "TRL defaults", 300, 3000),
        run("dpo", "TRL `precompute_ref_log_probs=True`", 320, 2900),
        run("dpo", "alignlab defaults", 600, 2400),
        run("grpo", "TRL defaults", 200, 4000, completions_per_s=1.0),
        run("grpo", "alignlab defaults", 250, 3000, completions_per_s=1.6),
        run("sft", "alignlab defaults", 900, 1000),  # no TRL row: no ratio
    ],
}


def test_ratios_compare_each_trainers_defaults():
    got = {r["algorithm"]: r for r in bench.ratios(REPORT["results"])}
    assert sorted(got) == ["dpo", "grpo"]
    assert got["dpo"]["speed"] == pytest.approx(2.0) and got["dpo"]["memory"] == pytest.approx(0.8)
    assert got["grpo"]["unit"] == "completions/s" and got["grpo"]["speed"] == pytest.approx(1.6)
    assert got["grpo"]["memory"] == pytest.approx(0.75)


def test_tables_show_every_run_and_the_ratios():
    table = bench.table(REPORT["results"]).splitlines()
    assert len(table) == 2 + len(REPORT["results"])
    assert table[2] == "| DPO | TRL defaults | 300 |  | 2.00 | 3000 | 25% | 0.6931, 0.5000 |"
    assert "| GRPO | alignlab defaults | 250 | 1.60 |" in table[6]
    ratio = bench.ratio_table(REPORT["results"]).splitlines()
    assert ratio[2:] == ["| DPO | 2.00× (tokens/s) | 0.80× |", "| GRPO | 1.60× (completions/s) | 0.75× |"]
    line = bench.measured_line(REPORT)
    for part in ("`python experiments/bench_trl.py --write-docs`", "2026-11-30", "2 cores", "302 GFLOP/s", "1.16.0"):
        assert part in line


def test_two_models_are_named_in_the_algorithm_column():
    results = [*REPORT["results"][:3], *({**r, "model": "300M"} for r in REPORT["results"][:3])]
    rows = bench.ratio_table(results).splitlines()[2:]
    assert [row.split(" | ")[0] for row in rows] == ["| DPO (30M)", "| DPO (300M)"]


def test_rewrite_replaces_only_what_lies_between_the_markers(tmp_path):
    page = tmp_path / "speed.md"
    page.write_text(f"# Speed\nbefore\n{bench.BEGIN}\nold table\n{bench.END}\nafter\n")
    (tmp_path / "README.md").write_text(f"intro\n{bench.BEGIN}\n{bench.END}\n")
    bench.write_docs(REPORT, (page, tmp_path / "README.md"))
    text = page.read_text()
    assert text.startswith(f"# Speed\nbefore\n{bench.BEGIN}\nMeasured by ") and text.endswith(f"{bench.END}\nafter\n")
    assert "old table" not in text and bench.table(REPORT["results"]) in text
    readme = (tmp_path / "README.md").read_text()
    assert bench.ratio_table(REPORT["results"]) in readme and "| DPO | TRL defaults |" not in readme
    bench.write_docs(REPORT, (page,))
    assert page.read_text() == text  # rewriting again changes nothing


@pytest.mark.parametrize("text", ["none", f"{bench.END}\n{bench.BEGIN}", f"{bench.BEGIN}{bench.BEGIN}{bench.END}"])
def test_rewrite_refuses_a_page_without_one_pair_of_markers(text):
    with pytest.raises(ValueError, match="bench_trl:begin"):
        bench.rewrite(text, "table", "README.md")


def test_the_docs_have_the_markers():
    for page in bench.DOCS:
        out = bench.rewrite(page.read_text(), "NEW TABLE", page.name)  # raises without one pair of markers
        assert out.count(bench.BEGIN) == out.count(bench.END) == 1 and "NEW TABLE" in out, page


def test_rewriting_the_docs_before_any_benchmark_ran_says_what_to_run_first(tmp_path):
    """docs/speed.md's `--docs-from` line with no results.json yet: what to run first, not a traceback."""
    with pytest.raises(
        SystemExit, match=r"no such file\. .* run `python experiments/bench_trl\.py \[--out DIR\]` first"
    ):
        bench.main(["--docs-from", str(tmp_path / "results.json")])
