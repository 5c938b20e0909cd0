"""Shared fixtures: an isolated cache for the embedded model, and helpers to compose and run configs."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

# The end-to-end tests' thresholds (an SFT start, then RM, PPO and GRPO moving it) were tuned on one
# float summation order, and the tiny model's training is chaotic in it: the 800-step SFT start ends
# at held-out exact match 0.789 with PyTorch's AVX2 CPU kernels, 0.836 with its AVX-512 ones and 0.914
# with MKL and oneDNN also held to AVX2. So the tests (and the runs they start in subprocesses, which
# inherit this) pin PyTorch's own kernels to AVX2, which every x86-64 CI machine has; set before torch
# is imported. Elsewhere (ARM) the variable is ignored.
os.environ.setdefault("ATEN_CPU_CAPABILITY", "avx2")

import torch  # noqa: E402

from alignlab.runner.config import compose  # noqa: E402,F401  (re-exported for the tests)

ROOT = Path(__file__).resolve().parent.parent
CONF = ROOT / "conf"
# The shared failing inputs (see their README); CI checks the folder out beside the clone.
CASES = Path(os.environ.get("ALIGNLAB_CASES") or ROOT.parent / "shared" / "cases")

# Every test (and every subprocess it starts) writes the tiny model into one throwaway cache and
# never touches the network.
os.environ["ALIGNLAB_CACHE"] = tempfile.mkdtemp(prefix="alignlab-test-cache-")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["WANDB_MODE"] = "offline"
os.environ.pop("WANDB_API_KEY", None)

# One thread per test process, and per subprocess it starts. Under pytest-xdist (the README runs
# `-n auto`) each worker gets a core this way, and two one-thread workers on two cores do about 1.4×
# the work of one two-thread process (the tiny model's matmuls are too small to split well). It also
# fixes the summation order: the end-to-end thresholds were tuned at one thread, and the GRPO length
# test's last rewards differ at two (mean 0.79 against 0.8+ at one), so `-n 0` runs use one thread too.
os.environ["OMP_NUM_THREADS"] = "1"
torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    """With -n, pytest-xdist hands each test file whole to one worker (`--dist loadfile`), so a file's
    shared runs are made once, in this order (`--no-loadscope-reorder`): the longest chain (SFT →
    reward model → PPO) first, then the other end-to-end files, then the rest, which fill in at the end.
    The sort is stable, so tests keep their order otherwise."""
    items.sort(key=lambda item: 0 if "rm_run" in item.fixturenames else 1 if item.get_closest_marker("slow") else 2)


class ListSource:
    """A source over in-memory canonical rows (the same rows serve both splits)."""

    def __init__(self, rows):
        self.rows = rows

    def load(self, kind, on_bad_row="error"):
        rows = self.rows[kind] if isinstance(self.rows, dict) else self.rows
        return {"train": rows, "eval": rows}


def run_cli(args: list[str], cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    """`python -m alignlab ARGS` in a subprocess, as a user would run it."""
    return subprocess.run(
        [sys.executable, "-m", "alignlab", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    """The embedded tiny model folder, written once per test session."""
    from omegaconf import OmegaConf

    from alignlab.models.loading import resolve_model_path

    cfg = compose()
    return Path(resolve_model_path(OmegaConf.create(OmegaConf.to_container(cfg.model, resolve=True))))


@pytest.fixture(scope="session")
def tiny(tiny_model_dir):
    """(model, tokenizer) of the embedded tiny model, loaded through from_pretrained."""
    from transformers import AutoModelForCausalLM

    from alignlab.models.loading import tokenizer_from_pretrained

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir), tokenizer_from_pretrained(tiny_model_dir)


QUIET = ["logger=csv", "trainer.enable_progress_bar=false"]
OPTIM = {"lr": 1e-3, "weight_decay": 0.0, "betas": [0.9, 0.999], "scheduler": "constant", "warmup_steps": 0}


def build_module(name: str, model, tokenizer, **overrides):
    """The LightningModule of conf/algorithm/<name>.yaml with its configured defaults (a root key it
    interpolates, e.g. ${max_tokens_per_micro_batch}, as conf/train.yaml sets it), some overridden."""
    from hydra.utils import get_class
    from omegaconf import OmegaConf

    from alignlab.runner.config import ALGORITHM_META_KEYS
    from alignlab.runner.preflight import load_option

    root = OmegaConf.load(CONF / "train.yaml")
    root.algorithm = load_option("algorithm", name)  # the file with the partials it includes (conf/_partials/)
    cfg = OmegaConf.to_container(root.algorithm, resolve=True)
    hparams = {k: v for k, v in cfg.items() if k not in (*ALGORITHM_META_KEYS, "defaults", "_target_")}
    return get_class(cfg["_target_"])(model, tokenizer, OPTIM, **{**hparams, **overrides})


def eval_curve(run_dir: Path, metric: str) -> list[tuple[int, float]]:
    """(step, value) of an eval metric from a run's metrics file."""
    with open(Path(run_dir) / "metrics.csv") as f:
        return [(int(r["step"]), float(r[metric])) for r in csv.DictReader(f) if r.get(metric)]


@pytest.fixture(scope="session")
def sft_run(tmp_path_factory, worker_id) -> dict:
    """An SFT run on the bundled task: the warm start every preference stage's test begins from.

    Trained once per test session: under pytest-xdist the first worker to need it trains it in the
    session's shared temporary folder while holding a lock, and the others read its result (a
    second copy of this 800-step run would cost the suite about a minute of one core)."""
    from filelock import FileLock

    from alignlab.train import train

    def run(run_dir: Path) -> dict:
        return train(
            compose(
                ["algorithm=sft", "trainer.max_steps=800", "batch_size=32", "trainer.val_check_interval=400", *QUIET],
                run_dir,
            )
        )

    if worker_id == "master":  # not under xdist
        return run(tmp_path_factory.mktemp("sft"))
    shared = tmp_path_factory.getbasetemp().parent  # the same folder for every worker of this session
    done = shared / "sft_run.json"
    with FileLock(str(shared / "sft_run.lock")):
        if not done.exists():
            done.write_text(json.dumps(run(shared / "sft")))
        return json.loads(done.read_text())


def from_sft(sft_run: dict, *overrides: str) -> list[str]:
    """Overrides that start a preference stage from the SFT run's model, 200 steps, validating every 100."""
    return [
        f"model.path={sft_run['model_dir']}",
        "model.tiny=null",
        "trainer.max_steps=200",
        "trainer.val_check_interval=100",
        "optim.lr=2e-4",
        *QUIET,
        *overrides,
    ]


@pytest.fixture(scope="session")
def rm_run(sft_run, tmp_path_factory) -> dict:
    """The reward model PPO uses: trained from the SFT run on pairs whose wrong answers include carry
    slips (data=arith_slips), with centred rewards so that scores carry correctness, not the prompt."""
    from alignlab.train import train

    run_dir = tmp_path_factory.mktemp("rm")
    overrides = from_sft(
        sft_run,
        "algorithm=rm",
        "data=arith_slips",
        "trainer.max_steps=3000",
        "trainer.val_check_interval=1500",
        "algorithm.center_rewards_coefficient=0.01",
    )
    return train(compose(overrides, run_dir))


@pytest.fixture(scope="session")
def family_dir(tmp_path_factory):
    """`family_dir(name) -> Path`: the folder of a tiny model of family `name` (see tests/families.py),
    written once per test session on first use."""
    from tests.families import build_family

    built: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in built:
            built[name] = build_family(name, tmp_path_factory.mktemp(f"family-{name}"))
        return built[name]

    return get
