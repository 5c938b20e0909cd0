"""Shared fixtures: an isolated cache for the embedded model, and helpers to compose and run configs."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from alignlab.config import compose  # noqa: F401  (re-exported for the tests)

ROOT = Path(__file__).resolve().parent.parent
CONF = ROOT / "conf"

# Every test (and every subprocess it starts) writes the tiny model into one throwaway cache and
# never touches the network.
os.environ["ALIGNLAB_CACHE"] = tempfile.mkdtemp(prefix="alignlab-test-cache-")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["WANDB_MODE"] = "offline"
os.environ.pop("WANDB_API_KEY", None)


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
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir), AutoTokenizer.from_pretrained(tiny_model_dir)
