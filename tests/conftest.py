"""Shared fixtures: an isolated cache for the embedded model, and helpers to compose and run configs."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CONF = ROOT / "conf"

# Every test (and every subprocess it starts) writes the tiny model into one throwaway cache and
# never touches the network.
os.environ["ALIGNLAB_CACHE"] = tempfile.mkdtemp(prefix="alignlab-test-cache-")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["WANDB_MODE"] = "offline"
os.environ.pop("WANDB_API_KEY", None)


def compose(overrides: list[str] | None = None, output_dir: str | Path = "/tmp/alignlab-test-run"):
    """The composed config for `overrides`, with hydra: interpolations given concrete values."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import open_dict

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = hydra_compose(config_name="train", overrides=overrides or [], return_hydra_config=True)
    choices = cfg.hydra.runtime.choices
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
        cfg.run_name = f"{cfg.algorithm.name}-{choices.model}"
        del cfg.hydra
    return cfg


def run_cli(args: list[str], cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    """`python -m alignlab ARGS` in a subprocess, as a user would run it."""
    return subprocess.run([sys.executable, "-m", "alignlab", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "PYTHONUNBUFFERED": "1"})


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
