"""Secrets never reach saved configs, logs or W&B: values of secret-looking keys, and the values of
secret environment variables wherever they appear, are replaced before anything is written."""

from __future__ import annotations

import os
import re
from pathlib import Path

from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import OmegaConf

REDACTED = "<redacted>"
# api_key, wandb_api_key, hf_token, access_token, secret, password; not tokenizer or max_new_tokens.
SECRET_KEY = re.compile(r"(api_?key|secret|passw(or)?d|(^|_)token$)", re.IGNORECASE)
# key=value inside override lines and Hydra's override_dirname ("a=1,+logger.wandb.api_key=x").
_SECRET_OVERRIDE = re.compile(r"([+~]*[\w.\-/]+)=([^,\s]*)")


def secret_values() -> list[str]:
    """Values of this process's secret environment variables (WANDB_API_KEY, HF_TOKEN, ...): a config
    can pull them in under any key, e.g. ${oc.env:HF_TOKEN}."""
    return [v for k, v in os.environ.items() if SECRET_KEY.search(k) and len(v) >= 8]


def redact_text(text: str) -> str:
    """`text` with secret environment values and the values of `secret_key=value` pairs replaced."""
    for value in secret_values():
        text = text.replace(value, REDACTED)

    def hide(match: re.Match) -> str:
        key = match.group(1).lstrip("+~").rsplit(".", 1)[-1]
        return f"{match.group(1)}={REDACTED}" if SECRET_KEY.search(key) else match.group(0)

    return _SECRET_OVERRIDE.sub(hide, text)


def redact(container):
    """A copy with every secret-looking key's value replaced (and secrets inside texts), for saved
    configs and loggers."""
    if isinstance(container, dict):
        return {k: (REDACTED if SECRET_KEY.search(str(k)) and v else redact(v)) for k, v in container.items()}
    if isinstance(container, list):
        return [redact(v) for v in container]
    if isinstance(container, str):
        return redact_text(container)
    return container


def redact_overrides(lines: list[str]) -> list[str]:
    """Command-line overrides with the values of secret-looking keys replaced."""
    return [redact_text(line) for line in lines]


def redact_yaml_file(path: Path) -> None:
    """Rewrite a saved YAML file (interpolations kept as written) with its secrets replaced."""
    data = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    clean = redact(data)
    if clean != data:
        path.write_text(OmegaConf.to_yaml(OmegaConf.create(clean)))


class RedactHydraFiles(Callback):
    """Hydra writes the composed config and the command line to <run>/.hydra/ (and a sweep's
    multirun.yaml) before the job starts; this rewrites them without secrets as the job starts."""

    def on_job_start(self, config, **kwargs) -> None:
        hydra = config.hydra
        files = []
        if hydra.output_subdir is not None:
            folder = Path(hydra.runtime.output_dir) / hydra.output_subdir
            files += [folder / name for name in ("config.yaml", "hydra.yaml", "overrides.yaml")]
        if hydra.mode == RunMode.MULTIRUN:
            files.append(Path(hydra.sweep.dir) / "multirun.yaml")
        for path in files:
            if path.is_file():
                redact_yaml_file(path)
