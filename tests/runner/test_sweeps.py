"""Sweeps end to end: a real 2×2 multirun on the tiny model, read back with alignlab.results, its W&B
runs (offline, real library), the analysis notebook executed headless, and the shipped sweep configs."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pandas as pd
import pytest
import yaml
from omegaconf import OmegaConf

from alignlab.results import (
    SweepError,
    load_history,
    load_sweep,
    lower_is_better,
    overrides_dict,
    plot_axes,
    resolve_sweep,
    varied_keys,
)
from tests.conftest import CONF, QUIET, ROOT, run_cli
from tests.wandb_records import history, run_record

BETAS, SEEDS = (0.1, 0.5), (0, 1)


@pytest.fixture(scope="session")
def sweep_dir(tmp_path_factory) -> Path:
    """`python -m alignlab -m algorithm.beta=0.1,0.5 seed=0,1 …` with W&B (offline) and the metrics file."""
    out = tmp_path_factory.mktemp("sweep") / "multirun"
    result = run_cli(
        [
            "-m",
            "algorithm.beta=0.1,0.5",
            "seed=0,1",
            "trainer.max_steps=12",
            "trainer.val_check_interval=6",
            "trainer.enable_progress_bar=false",
            "evaluation.exact_match=false",
            f"hydra.sweep.dir={out}",
        ],
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def job_folders(sweep: Path) -> list[Path]:
    return sorted((p for p in sweep.iterdir() if p.is_dir()), key=lambda p: int(p.name))


def metrics_csv(folder: Path) -> pd.DataFrame:
    return pd.read_csv(folder / "metrics.csv")


# -- alignlab.results on the real sweep ---------------------------------------------------------
def test_load_sweep_has_one_row_per_run_matching_its_folder(sweep_dir):
    runs = load_sweep(sweep_dir)
    assert len(runs) == 4
    assert sorted(zip(runs["algorithm.beta"], runs["seed"])) == [(b, s) for b in BETAS for s in SEEDS]
    assert runs["algorithm.beta"].dtype == float and set(runs["algorithm"]) == {"dpo"}
    assert runs["finished"].all() and (runs["steps"] == 12).all()
    for folder in job_folders(sweep_dir):
        row = runs.set_index("run").loc[folder.name]
        summary = json.loads((folder / "summary.json").read_text())
        for metric, value in summary["metrics"].items():
            assert row[metric] == pytest.approx(value), metric
        history = metrics_csv(folder)
        assert row["best/eval/loss"] == pytest.approx(history["eval/loss"].min())
        assert row["best/eval/rewards/accuracies"] == pytest.approx(history["eval/rewards/accuracies"].max())
        assert Path(row["run_dir"]) == folder
        (offline,) = folder.glob("wandb/offline-run-*")
        assert offline.name.endswith(row["wandb_id"])
        config = yaml.safe_load((folder / "config.yaml").read_text())
        assert (config["algorithm"]["beta"], config["seed"]) == (row["algorithm.beta"], row["seed"])


def test_load_history_is_the_metrics_files_in_long_form(sweep_dir):
    history = load_history(sweep_dir)
    assert {"run", "algorithm.beta", "seed", "step", "metric", "value"} <= set(history.columns)
    for folder in job_folders(sweep_dir):
        wide = metrics_csv(folder).dropna(subset=["eval/loss"])
        mine = history[(history.run == folder.name) & (history.metric == "eval/loss")]
        assert mine["step"].tolist() == wide["step"].tolist()
        assert mine["value"].tolist() == pytest.approx(wide["eval/loss"].tolist())
    assert len(history[history.metric == "eval/loss"]) == 4 * 3  # step 0 and every 6 steps of 12


def test_half_finished_sweep_lists_unfinished_runs(sweep_dir, tmp_path):
    copy = tmp_path / "sweep"
    shutil.copytree(sweep_dir, copy, ignore=shutil.ignore_patterns("model", "checkpoints", "wandb"))
    (copy / "2" / "summary.json").unlink()  # job 2 was killed before it finished
    with pytest.raises(SweepError, match=r"1 of 4 runs .* have not finished: 2\b"):
        load_sweep(copy)
    runs = load_sweep(copy, allow_unfinished=True)
    assert runs.set_index("run")["finished"].to_dict() == {"0": True, "1": True, "2": False, "3": True}
    assert runs.set_index("run").loc["2", "algorithm.beta"] == 0.5  # its hyper-parameters are still there


def test_empty_or_missing_sweep_is_a_clear_error(tmp_path):
    with pytest.raises(SweepError, match="no runs found"):
        load_sweep(tmp_path)
    with pytest.raises(SweepError, match="neither a folder nor a W&B path"):
        load_sweep(tmp_path / "nowhere")


def fake_sweep(folder: Path, jobs: list[dict]) -> Path:
    """A multirun folder as alignlab writes one, without training: per job its overrides, config.yaml,
    summary.json and metrics.csv. A job: {"overrides": [...], "algorithm": name, "seed": n, "metrics": {...}};
    its metrics.csv logs each final metric at steps 0 and 10 (half the value, then the value)."""
    for num, job in enumerate(jobs):
        run = folder / str(num)
        (run / ".hydra").mkdir(parents=True)
        (run / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(job["overrides"]))
        (run / "config.yaml").write_text(yaml.safe_dump({"algorithm": {"name": job["algorithm"]}, "seed": job["seed"]}))
        summary = {"metrics": job["metrics"], "steps": 10, "seconds": 1.0, "overrides": job["overrides"]}
        (run / "summary.json").write_text(json.dumps(summary))
        half = {k: v / 2 for k, v in job["metrics"].items()}
        curve = pd.DataFrame([{"step": 0, **half}, {"step": 10, **job["metrics"]}])
        curve.to_csv(run / "metrics.csv", index=False)
    return folder


def algorithm_sweep(folder: Path) -> Path:
    """`-m algorithm=dpo,cpo,sft seed=0,1`: no β anywhere; SFT logs no reward margins."""
    jobs = []
    for algorithm, accuracy in (("dpo", 0.8), ("cpo", 0.7), ("sft", 0.6)):
        for seed in (0, 1):
            metrics = {"eval/exact_match": accuracy + seed / 100, "eval/loss": 1 - accuracy}
            if algorithm != "sft":
                metrics["eval/rewards/margins"] = accuracy / 2
            overrides = [f"algorithm={algorithm}", f"seed={seed}"]
            jobs.append({"overrides": overrides, "algorithm": algorithm, "seed": seed, "metrics": metrics})
    return fake_sweep(folder, jobs)


def test_the_plot_axes_follow_what_the_sweep_varied(tmp_path):
    runs = load_sweep(algorithm_sweep(tmp_path / "algorithms"))
    assert varied_keys(runs) == ["algorithm"] and plot_axes(runs) == ("algorithm", [])
    jobs = [
        {"overrides": [f"algorithm={a}", f"algorithm.beta={b}"], "algorithm": a, "seed": 0, "metrics": {"eval/loss": b}}
        for a in ("dpo", "cpo")
        for b in (0.1, 0.5)
    ]
    grid = load_sweep(fake_sweep(tmp_path / "grid", jobs))
    assert plot_axes(grid) == ("algorithm.beta", ["algorithm"])  # numbers on the axis, a line per algorithm
    assert plot_axes(grid, "algorithm") == ("algorithm", ["algorithm.beta"])
    seeds = [{"overrides": [f"seed={s}"], "algorithm": "dpo", "seed": s, "metrics": {"eval/loss": s}} for s in (0, 1)]
    assert plot_axes(load_sweep(fake_sweep(tmp_path / "seeds", seeds))) == ("seed", [])
    with pytest.raises(SweepError, match=r"optim.lr is not a column of the sweep; the keys it varied: algorithm\b"):
        plot_axes(runs, "optim.lr")


def test_a_relative_sweep_path_is_read_from_where_the_command_ran(tmp_path, monkeypatch):
    """The notebook's kernel runs in notebooks/; ALIGNLAB_SWEEP=multirun/<time> was given at the root."""
    sweep = algorithm_sweep(tmp_path / "multirun" / "2026-12-07_21-00-00")
    (tmp_path / "notebooks").mkdir()
    monkeypatch.chdir(tmp_path / "notebooks")
    monkeypatch.setenv("PWD", str(tmp_path))  # the shell's directory, which the kernel inherits
    assert resolve_sweep("multirun/2026-12-07_21-00-00") == sweep
    monkeypatch.setenv("PWD", "/nowhere")  # e.g. Jupyter started elsewhere: the folders above are tried
    assert resolve_sweep("multirun/2026-12-07_21-00-00") == sweep
    assert len(load_sweep("multirun/2026-12-07_21-00-00")) == 6
    demo = algorithm_sweep(tmp_path / "multirun" / "demo" / "2026-12-07_21-00-00")
    assert resolve_sweep("multirun/demo/2026-12-07_21-00-00") == demo  # three parts, yet not a W&B group
    assert resolve_sweep("me/project/group") == "me/project/group"  # no such folder: a W&B group
    with pytest.raises(SweepError, match=f"multirun/missing is neither .* looked for the folder from .*{tmp_path}"):
        resolve_sweep("multirun/missing")


def test_overrides_are_typed_and_hydra_keys_dropped():
    assert overrides_dict(["algorithm.beta=0.1", "seed=2", "algorithm=cpo", "hydra.sweep.dir=x", "sweep=demo"]) == {
        "algorithm.beta": 0.1,
        "seed": 2,
        "algorithm": "cpo",
    }
    assert lower_is_better("eval/loss") and lower_is_better("train/kl") and not lower_is_better("eval/exact_match")


# -- W&B, offline with the real library -----------------------------------------------------------
def test_wandb_runs_share_the_sweep_group_and_are_named_after_their_overrides(sweep_dir):
    names = set()
    for folder in job_folders(sweep_dir):
        run, config = run_record(folder)
        summary = json.loads((folder / "summary.json").read_text())
        assert run.run_group == f"multirun-{sweep_dir.name}" == summary["wandb"]["group"]
        assert run.run_id == summary["wandb"]["id"]
        names.add(run.display_name)
        saved = yaml.safe_load((folder / "config.yaml").read_text())
        assert {k: config[k] for k in saved} == saved  # the whole resolved config
        assert config["overrides"] == summary["overrides"]
    assert names == {f"algorithm.beta={b},seed={s}" for b in BETAS for s in SEEDS}


def test_the_metrics_file_carries_the_numbers_wandb_logged(sweep_dir):
    for folder in job_folders(sweep_dir):
        logged = [(row["trainer/global_step"], row["eval/loss"]) for row in history(folder) if "eval/loss" in row]
        wide = metrics_csv(folder).dropna(subset=["eval/loss"])
        assert len(logged) == len(wide) == 3
        assert [step for step, _ in logged] == wide["step"].tolist()
        assert [value for _, value in logged] == pytest.approx(wide["eval/loss"].tolist())


class FakeRun:
    """What the W&B public API returns for a run, with the fields alignlab.results reads."""

    def __init__(self, name, beta, seed, state, accuracies):
        self.name, self.id, self.group, self.state = name, f"id-{name}", "dpo_beta-1", state
        self.url = f"https://wandb.ai/me/alignlab/runs/{self.id}"
        self.config = {
            "algorithm": {"name": "dpo", "beta": beta},
            "seed": seed,
            "overrides": [f"algorithm.beta={beta}"],
        }
        self.summary = {"eval/rewards/accuracies": accuracies[-1], "trainer/global_step": 20, "_runtime": 9.0}
        self._history = pd.DataFrame(
            {
                "_step": range(len(accuracies)),
                "trainer/global_step": [0, 10, 20][: len(accuracies)],
                "eval/rewards/accuracies": accuracies,
            }
        )

    def history(self, samples, pandas):
        return self._history


class FakeApi:
    def __init__(self, runs):
        self._runs, self.asked = runs, []

    def runs(self, path, filters):
        self.asked.append((path, filters))
        return self._runs


def test_load_sweep_from_the_wandb_api():
    api = FakeApi(
        [FakeRun("a", 0.1, 0, "finished", [0.5, 0.8, 0.7]), FakeRun("b", 0.5, 0, "finished", [0.5, 0.6, 0.9])]
    )
    runs = load_sweep("me/alignlab/dpo_beta-1", api=api)
    assert api.asked == [("me/alignlab", {"group": "dpo_beta-1"})]
    assert runs["algorithm.beta"].tolist() == [0.1, 0.5] and runs["wandb_id"].tolist() == ["id-a", "id-b"]
    assert runs["eval/rewards/accuracies"].tolist() == [0.7, 0.9]
    assert runs["best/eval/rewards/accuracies"].tolist() == [0.8, 0.9]
    history = load_history("me/alignlab/dpo_beta-1", api=api)
    assert history[history.run == "a"]["step"].tolist() == [0, 10, 20]
    api = FakeApi([FakeRun("a", 0.1, 0, "finished", [0.5]), FakeRun("b", 0.5, 0, "running", [0.5])])
    with pytest.raises(SweepError, match="have not finished: b"):
        load_sweep("me/alignlab/dpo_beta-1", api=api)


# -- the notebook -------------------------------------------------------------------------------
NOTEBOOK = ROOT / "notebooks" / "sweep_analysis.ipynb"


def test_notebook_is_stored_without_outputs():
    import nbformat

    notebook = nbformat.read(NOTEBOOK, as_version=4)
    code = [c for c in notebook.cells if c.cell_type == "code"]
    assert code and all(c.outputs == [] and c.execution_count is None for c in code)


def test_notebook_runs_top_to_bottom_on_the_sweep(sweep_dir, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    monkeypatch.setenv("ALIGNLAB_SWEEP", str(sweep_dir))
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}).execute()
    outputs = [o for c in notebook.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert any("image/png" in o.get("data", {}) for o in outputs)  # the plots were drawn
    assert any(f"sweep: {sweep_dir}" in o.get("text", "") for o in outputs)


def test_notebook_plots_a_sweep_over_algorithms_named_from_the_repository_root(tmp_path, monkeypatch):
    """No β in the sweep: the notebook plots what it varied (the algorithm), read from `multirun/<time>` as
    given where `jupyter execute notebooks/sweep_analysis.ipynb` ran, though its kernel runs in notebooks/."""
    import nbformat
    from nbclient import NotebookClient

    algorithm_sweep(tmp_path / "multirun" / "2026-12-07_21-00-00")
    monkeypatch.setenv("ALIGNLAB_SWEEP", "multirun/2026-12-07_21-00-00")
    monkeypatch.setenv("PWD", str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    folder = tmp_path / "notebooks"
    folder.mkdir()
    NotebookClient(notebook, kernel_name="python3", resources={"metadata": {"path": str(folder)}}).execute()
    outputs = [o for c in notebook.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert sum("image/png" in o.get("data", {}) for o in outputs) == 2  # metrics by algorithm, learning curves
    text = "".join(o.get("text", "") for o in outputs)
    assert f"sweep: {tmp_path / 'multirun' / '2026-12-07_21-00-00'} (ALIGNLAB_SWEEP=multirun/" in text
    assert "x axis: algorithm; one line per: (one line)" in text
    best = [o["data"]["text/plain"] for o in notebook.cells[-1].outputs if "text/plain" in o.get("data", {})]
    assert "dpo" in best[0] and "sft" not in best[0]  # the best setting: DPO's accuracy is the highest


# -- shipped sweep configs ----------------------------------------------------------------------
SWEEPS = sorted(p.stem for p in (CONF / "sweep").glob("*.yaml"))


@pytest.mark.parametrize("name", SWEEPS)
def test_shipped_sweep_config_names_real_keys(name):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[f"sweep={name}"], return_hydra_config=True)
    assert cfg.hydra.mode.name == "MULTIRUN"
    params = OmegaConf.to_container(cfg.hydra.sweeper.params)
    assert params
    for key in params:
        if key == "algorithm":  # a config group
            assert all((CONF / "algorithm" / f"{a}.yaml").exists() for a in params[key].split(","))
        else:
            assert OmegaConf.select(cfg, key, default="missing") != "missing", key
    assert f"/multirun/{name}/" in cfg.hydra.sweep.dir


def test_optuna_search_maximises_the_named_held_out_metric(tmp_path):
    """sweep=optuna_dpo: each trial returns `objective` (a held-out metric) and Optuna keeps the best."""
    out = tmp_path / "search"
    result = run_cli(
        [
            "sweep=optuna_dpo",
            "hydra.sweeper.n_trials=3",
            "trainer.max_steps=6",
            "trainer.val_check_interval=6",
            "evaluation.exact_match=false",
            *QUIET,
            f"hydra.sweep.dir={out}",
        ],
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    runs = load_sweep(out)
    assert len(runs) == 3 and {"algorithm.beta", "optim.lr"} <= set(runs.columns)
    assert runs["algorithm.beta"].between(0.01, 1.0).all() and runs["optim.lr"].between(1e-4, 3e-3).all()
    best = yaml.safe_load((out / "optimization_results.yaml").read_text())
    assert best["best_value"] == pytest.approx(runs["eval/rewards/accuracies"].max())
    winner = runs.loc[runs["eval/rewards/accuracies"].idxmax()]
    assert best["best_params"]["algorithm.beta"] == pytest.approx(winner["algorithm.beta"])


def test_objective_is_a_final_metric_or_a_clear_error():
    from alignlab.errors import ConfigError
    from alignlab.train import objective_value

    result = {"metrics": {"eval/exact_match": 0.75, "train/loss": 0.3}}
    assert objective_value(result, None) is None
    assert objective_value(result, "eval/exact_match") == 0.75
    with pytest.raises(ConfigError, match=r"objective='eval/acc' is not among .*'eval/exact_match'"):
        objective_value(result, "eval/acc")


@pytest.mark.slow
def test_compare_algorithms_study_writes_its_table_and_plot(tmp_path):
    """The study end to end on a tiny budget: one algorithm's β grid, its table, its plot."""
    import subprocess
    import sys

    out = tmp_path / "study"
    args = ["--out", str(out), "--steps", "4", "--sft-steps", "8", "--algorithms", "dpo"]
    subprocess.run([sys.executable, str(ROOT / "experiments" / "compare_algorithms.py"), *args], check=True, cwd=ROOT)
    table = pd.read_csv(out / "results.csv")
    assert table["algorithm.beta"].tolist() == [0.05, 0.1, 0.5] and set(table["algorithm"]) == {"dpo"}
    assert table["kl_to_sft"].between(-0.5, 5).all()  # a Monte-Carlo estimate: near 0 after 4 steps
    assert (out / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| dpo | 0.5 |" in (out / "results.md").read_text()

    import importlib.util

    spec = importlib.util.spec_from_file_location("study", ROOT / "experiments" / "compare_algorithms.py")
    study = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(study)
    sft = str(out / "sft" / "model")
    assert study.kl_to_reference(sft, sft, samples_per_prompt=2) == 0.0  # every log-ratio is exactly 0
    assert study.kl_to_reference(str(out / "runs" / "dpo-2" / "model"), sft, samples_per_prompt=2) != 0.0


# -- run names ----------------------------------------------------------------------------------
def test_a_run_is_named_after_its_algorithm_and_starting_model(tmp_path):
    from alignlab.runner.config import compose

    folder = tmp_path / "my-base"
    folder.mkdir()
    assert compose().run_name == "dpo-tiny"
    assert compose(["algorithm=sft", f"model.path={folder}", "model.tiny=null"]).run_name == "sft-my-base"
    assert compose(["model.path=/elsewhere/my-base/", "model.tiny=null"]).run_name == "dpo-my-base"
    assert compose(["model=qwen"]).run_name == "dpo-Qwen2.5-0.5B-Instruct"
    assert compose(["run_name=mine", f"model.path={folder}", "model.tiny=null"]).run_name == "mine"


def test_a_run_started_from_an_export_is_named_after_the_run_that_wrote_it(tmp_path):
    from omegaconf import OmegaConf

    from alignlab.runner.config import compose
    from alignlab.runner.sweeps import name_run

    run = tmp_path / "2026-11-29_10-00-00"
    (run / "model").mkdir(parents=True)
    overrides = [f"model.path={run / 'model'}", "model.tiny=null"]
    assert compose(overrides).run_name == "dpo-2026-11-29_10-00-00"  # no record: the run folder's name
    (run / "config.yaml").write_text("run_name: sft-tiny\nseed: 0\n")  # written as the run starts
    assert compose(overrides).run_name == "dpo-sft-tiny"
    (run / "summary.json").write_text(json.dumps({"run_name": "sft-lr3", "steps": 800}))
    assert compose(["algorithm=grpo", *overrides]).run_name == "grpo-sft-lr3"
    # As in `python -m alignlab`: run_name is null until the run names itself.
    cfg = OmegaConf.create({"run_name": None, "algorithm": {"name": "kto"}, "model": {"path": str(run / "model")}})
    name_run(cfg, None)
    assert cfg.run_name == "kto-sft-lr3"


def test_a_run_name_carries_the_overrides_that_differ_from_the_defaults(monkeypatch):
    from alignlab.runner.config import compose
    from alignlab.runner.sweeps import MAX_NAME

    assert compose(["algorithm.beta=0.5"]).run_name == "dpo-tiny-beta=0.5"
    assert compose(["algorithm.beta=0.1", "seed=0", "data=arith_pairs"]).run_name == "dpo-tiny"  # all defaults
    # defaults written in a partial the option includes (conf/_partials/) count as defaults too
    assert compose(["algorithm=grpo", "algorithm.use_vllm=false", "data.shuffle=true"]).run_name == "grpo-tiny"
    name = compose(["algorithm=cpo", "algorithm.beta=0.5", "optim.lr=2e-4", "model.lora.r=16"]).run_name
    assert name == "cpo-tiny-beta=0.5,lr=2e-4,lora.r=16"  # each key without its group
    plumbing = [
        *QUIET,
        "hydra.run.dir=/tmp/x",
        "save_model=false",
        "resume=auto",
        "callbacks.checkpoint.every_n_train_steps=5",
    ]
    assert compose(["trainer.max_steps=3", *plumbing]).run_name == "dpo-tiny-max_steps=3"
    assert compose(["algorithm=kto", "data.unpair=true"]).run_name == "kto-tiny-unpair=true"
    # Made safe for a file name; a secret (by key, or a secret environment variable's value) never appears.
    grpo = compose(["algorithm=grpo", "algorithm.reward_funcs=[accuracy,format]"]).run_name
    assert grpo == "grpo-tiny-reward_funcs=_accuracy,format_"
    monkeypatch.setenv("HF_TOKEN", "hf_abcdefgh12345")
    secret = ["+logger.wandb.api_key=s3cr3t-key", "+data.hf_token=abc", "+data.note=hf_abcdefgh12345", "seed=1"]
    assert compose(secret).run_name == "dpo-tiny-seed=1"
    long = compose([f"algorithm.beta=0.{'1' * 150}"]).run_name
    assert (
        len(long) == MAX_NAME
        and long.startswith("dpo-tiny-beta=0.111")
        and long != compose(["algorithm.beta=0.2"]).run_name
    )


def test_the_run_folder_is_named_after_the_run(tmp_path):
    """`outputs/<algorithm>/<date_time>_<run name>`, the name's `=` and `,` written `-` and `+` so that
    the folder can be given back to Hydra (`model.path=<run>/model`); `run_name=` names the folder too;
    `hydra.run.dir=` still chooses it outright."""
    import re

    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from alignlab.runner.sweeps import register_resolvers

    args = ["algorithm.beta=0.5", "trainer.max_steps=1", "evaluation.at_start=false", *QUIET]
    result = run_cli([*args, f"paths.root_dir={tmp_path}"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    (folder,) = (tmp_path / "outputs" / "dpo").iterdir()
    assert re.fullmatch(r"\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d_dpo-tiny-beta-0\.5\+max_steps-1", folder.name)
    assert json.loads((folder / "summary.json").read_text())["run_name"] == "dpo-tiny-beta=0.5,max_steps=1"
    given_back = OverridesParser.create().parse_override(f"model.path={folder / 'model'}")
    assert given_back.value() == str(folder / "model") and (folder / "model" / "config.json").is_file()

    register_resolvers()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        mine = hydra_compose("train", ["run_name='my/run,2'"], return_hydra_config=True)
        chosen = hydra_compose("train", ["algorithm.beta=0.5", "hydra.run.dir=/tmp/here"], return_hydra_config=True)
        long = hydra_compose("train", [f"algorithm.beta=0.{'1' * 150}"], return_hydra_config=True)
        unnamed = hydra_compose("train", ["model.tiny=null", "model.path=???"], return_hydra_config=True)
    assert re.search(r"/outputs/dpo/[\d_-]+_my_run\+2$", mine.hydra.run.dir) and chosen.hydra.run.dir == "/tmp/here"
    OverridesParser.create().parse_override(f"hydra.run.dir={long.hydra.run.dir}")  # the hashed tail parses too
    assert unnamed.hydra.run.dir.endswith("_run")  # a config too broken to name: the config checks report it


def study_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("study", ROOT / "experiments" / "compare_algorithms.py")
    study = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(study)
    return study


def drawn_labels(draw) -> tuple:
    """The figure `draw()` saves and its point labels' texts, after checking that no label overlaps
    another label or a marker."""
    import matplotlib.pyplot as plt
    from matplotlib.text import Text

    figures = []
    real_savefig = plt.Figure.savefig

    def savefig(fig, *args, **kwargs):
        figures.append(fig)
        return real_savefig(fig, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(plt.Figure, "savefig", savefig)
        draw()
    (fig,) = figures
    renderer = fig.canvas.get_renderer()
    labels = [t for ax in fig.axes for t in ax.texts]
    boxes = [Text.get_window_extent(t, renderer) for t in labels]
    assert not [(a, b) for i, a in enumerate(boxes) for b in boxes[i + 1 :] if a.overlaps(b)]
    for ax in fig.axes:
        markers = [
            ax.transData.transform(p) for line in ax.lines for p in line.get_xydata() if line.get_marker() == "o"
        ]
        mine = [Text.get_window_extent(t, renderer) for t in ax.texts]
        assert not [(b, m) for b in mine for m in markers if b.contains(*m)]
    return fig, [t.get_text() for t in labels]


def test_the_study_plot_labels_no_two_points_on_top_of_each_other(tmp_path):
    """experiments/compare_algorithms.py's plot on the study's numbers (docs/results.md): every β label
    drawn, none overlapping another or a marker, the crowd near the SFT model in a zoomed panel."""
    study = study_module()
    rows = [("dpo", 0.05, 0.859, 0.082), ("dpo", 0.1, 0.859, 0.107), ("dpo", 0.5, 0.820, 0.159)]
    rows += [("cpo", 0.05, 0.859, 0.086), ("cpo", 0.1, 0.859, 0.091), ("cpo", 0.5, 0.828, 0.094)]
    rows += [("orpo", 0.05, 0.852, 0.077), ("orpo", 0.1, 0.844, 0.074), ("orpo", 0.5, 0.836, 0.070)]
    rows += [("simpo", 1.0, 0.820, 0.100), ("simpo", 2.0, 0.836, 0.080), ("simpo", 2.5, 0.836, 0.090)]
    rows += [("kto", 0.05, 0.508, 3.24), ("kto", 0.1, 0.539, 3.16), ("kto", 0.5, 0.672, 1.21)]
    table = pd.DataFrame(rows, columns=["algorithm", "algorithm.beta", "eval/exact_match", "kl_to_sft"])
    _, texts = drawn_labels(lambda: study.plot(table, 0.781, tmp_path / "plot.png"))
    labels = [t for t in texts if t.startswith("β=")]
    assert len(labels) == len(table)  # the 3 far KTO runs in the first panel, the 12 near ones zoomed


@pytest.mark.parametrize("study", [[], ["--dpo-loss-types"]])
def test_a_replot_before_the_study_ran_says_what_to_run_first(study, tmp_path):
    """docs/results.md's `--replot` lines with no results yet: the command that writes them, no traceback."""
    out = tmp_path / "none"
    run_first = " ".join(["python experiments/compare_algorithms.py", *study, "--out", str(out)])
    with pytest.raises(
        SystemExit, match=rf"has no results\.csv or results\.md: run the study first \({re.escape(run_first)},"
    ):
        study_module().main(["--replot", *study, "--out", str(out)])
    out.mkdir()
    (out / "results.csv").write_text("algorithm,algorithm.beta,eval/exact_match,kl_to_sft\ndpo,0.1,0.8,0.1\n")
    (out / "results.md").write_text("| algorithm | β |\n")
    with pytest.raises(SystemExit, match="has no 'SFT start … held-out exact match <number>' line"):
        study_module().main(["--replot", *study, "--out", str(out)])
    assert not (out / "plot.png").exists()


def test_the_loss_type_plot_labels_each_point_with_its_loss_type(tmp_path):
    """The `--dpo-loss-types` plot on the measured numbers (docs/results.md): one point per loss type,
    labelled with its name, none overlapping; the legend holds only the SFT start."""
    study = study_module()
    measured = {"sigmoid": (0.859, 0.095), "hinge": (0.852, 0.139), "ipo": (0.797, 1.333), "robust": (0.859, 0.095)}
    measured |= {"nca_pair": (0.867, 0.081), "bco_pair": (0.859, 0.094), "sppo_hard": (0.828, 0.253)}
    measured |= {"aot": (0.859, 0.095), "aot_unpaired": (0.859, 0.094), "apo_zero": (0.867, 0.083)}
    measured |= {"apo_down": (0.867, 0.084), "discopop": (0.859, 0.072), "sft": (0.859, 0.076)}
    measured |= {"sigmoid_norm": (0.875, 0.079)}
    rows = [(name, accuracy, kl) for name, (accuracy, kl) in measured.items()]
    table = pd.DataFrame(rows, columns=["algorithm.loss_type", "eval/exact_match", "kl_to_sft"])
    fig, texts = drawn_labels(lambda: study.draw(table, 0.836, tmp_path / "plot.png", loss_types=True))
    assert sorted(texts) == sorted(measured)  # ipo in the first panel, the 13 near ones zoomed
    assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()] == ["SFT start"]


def test_the_documented_notebook_command_keeps_the_executed_copy(sweep_dir, tmp_path):
    """docs/results.md's `jupyter execute` line, run as written on a copy of the notebook: the executed
    notebook (with its plots) is saved beside it, and the stored notebook stays without outputs."""
    import os
    import subprocess
    import sys

    import nbformat

    (line,) = [ln for ln in (ROOT / "docs" / "results.md").read_text().splitlines() if ln.startswith("jupyter ")]
    command = line.split("#", 1)[0].split()
    assert command[:3] == ["jupyter", "execute", "notebooks/sweep_analysis.ipynb"] and command[3].startswith(
        "--output="
    )
    (tmp_path / "notebooks").mkdir()
    shutil.copy(NOTEBOOK, tmp_path / "notebooks")
    jupyter = [sys.executable, "-m", "jupyter"]
    env = {**os.environ, "ALIGNLAB_SWEEP": str(sweep_dir), "PYTHONPATH": str(ROOT)}
    subprocess.run([*jupyter, *command[1:]], cwd=tmp_path, env=env, check=True, capture_output=True, timeout=600)
    saved = tmp_path / "notebooks" / (command[3].split("=", 1)[1] + ".ipynb")
    outputs = [o for c in nbformat.read(saved, as_version=4).cells if c.cell_type == "code" for o in c.outputs]
    assert any("image/png" in o.get("data", {}) for o in outputs)
    assert (tmp_path / "notebooks" / NOTEBOOK.name).read_bytes() == NOTEBOOK.read_bytes()
