"""Secrets stay out of everything a run writes; models load without running remote code or pickles."""

from __future__ import annotations

import os
import subprocess
import sys

from alignlab.runner.redact import redact, redact_text
from tests.conftest import QUIET

SECRETS = {"flag": "cli-secret-0123", "WANDB_API_KEY": "wandb-secret-4567", "HF_TOKEN": "hf-secret-89ab"}


def test_a_real_run_writes_no_secret_anywhere(tmp_path):
    """A secret given on the command line (as Hydra's `env_set` for the job, which reads it: a key added
    with `+` that nothing reads is refused), one in WANDB_API_KEY (W&B kept offline) and one in HF_TOKEN
    that the config pulls in under an innocent name: none appears in any file of the run folder
    (config.yaml, .hydra/, metrics, W&B's offline files, the model) or in the console output."""
    run_dir = tmp_path / "run"
    args = [
        "logger=wandb",
        "trainer.max_steps=2",
        "evaluation.at_start=false",
        f"+hydra.job.env_set.HUGGING_FACE_HUB_TOKEN={SECRETS['flag']}",
        "+hydra.job.env_set.NOTES=${oc.env:HF_TOKEN}",
        f"hydra.run.dir={run_dir}",
        *QUIET[1:],
    ]
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_API_KEY": SECRETS["WANDB_API_KEY"]}
    env["HF_TOKEN"] = SECRETS["HF_TOKEN"]
    out = subprocess.run(
        [sys.executable, "-m", "alignlab", *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stderr[-2000:]
    written = [p for p in run_dir.rglob("*") if p.is_file()]
    assert any(p.suffix == ".wandb" for p in written) and (run_dir / ".hydra" / "overrides.yaml").is_file()
    for secret in SECRETS.values():
        assert secret not in out.stdout + out.stderr
        leaks = [str(p.relative_to(run_dir)) for p in written if secret.encode() in p.read_bytes()]
        assert not leaks, f"{secret} written to {leaks}"
    assert "HUGGING_FACE_HUB_TOKEN: <redacted>" in (run_dir / ".hydra" / "hydra.yaml").read_text()


def test_redaction_by_key_by_override_and_by_environment_value(monkeypatch):
    monkeypatch.setenv("MY_SERVICE_TOKEN", "tok-123456789")
    assert redact({"api_key": "k", "tokenizer": "t", "max_new_tokens": 8, "empty_secret": None}) == {
        "api_key": "<redacted>",
        "tokenizer": "t",
        "max_new_tokens": 8,
        "empty_secret": None,
    }
    assert redact_text("seed=0,+logger.wandb.api_key=abc,max_new_tokens=8") == (
        "seed=0,+logger.wandb.api_key=<redacted>,max_new_tokens=8"
    )
    assert redact(["prefix tok-123456789 suffix"]) == ["prefix <redacted> suffix"]


def tiny_copy(tiny_model_dir, tmp_path):
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    return folder


def load(folder, **model):
    from omegaconf import OmegaConf

    from alignlab.models.loading import load_model
    from alignlab.runner.config import compose

    cfg = OmegaConf.to_container(compose().model, resolve=True)
    cfg.update({"path": str(folder), "tiny": None, **model})
    return load_model(OmegaConf.create(cfg))


def test_pickled_weights_are_not_loaded(tiny_model_dir, tmp_path):
    """A folder whose weights exist only as a pickle (pytorch_model.bin) is refused, not unpickled."""
    import pytest
    import torch
    from safetensors.torch import load_file

    from alignlab.errors import ModelLoadError

    folder = tiny_copy(tiny_model_dir, tmp_path)
    weights = folder / "model.safetensors"
    torch.save(load_file(weights), folder / "pytorch_model.bin")
    weights.unlink()
    with pytest.raises(ModelLoadError, match=r"Could not load model weights from .*model"):
        load(folder)


def test_remote_code_runs_only_when_asked(tiny_model_dir, tmp_path):
    """A model folder that asks for its own Python code (auto_map) is refused unless
    model.trust_remote_code=true; the code is never imported otherwise."""
    import json

    import pytest

    from alignlab.errors import ModelLoadError

    folder = tiny_copy(tiny_model_dir, tmp_path)
    marker = tmp_path / "remote_code_ran"
    (folder / "custom_model.py").write_text(
        f"open({str(marker)!r}, 'w').close()\n"
        "from transformers import Qwen2Config, Qwen2ForCausalLM\n"
        "class CustomConfig(Qwen2Config):\n    model_type = 'custom_qwen2'\n"
        "class CustomModel(Qwen2ForCausalLM):\n    config_class = CustomConfig\n"
    )
    config = json.loads((folder / "config.json").read_text())
    config.update(
        model_type="custom_qwen2",
        auto_map={"AutoConfig": "custom_model.CustomConfig", "AutoModelForCausalLM": "custom_model.CustomModel"},
    )
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="trust_remote_code"):
        load(folder)
    assert not marker.exists()
