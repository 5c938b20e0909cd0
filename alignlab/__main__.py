"""`python -m alignlab [overrides]`: compose conf/ with Hydra and train."""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from alignlab.errors import AlignlabError

CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "conf")


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def main(cfg: DictConfig) -> None:
    from alignlab.train import train

    try:
        train(cfg)
    except AlignlabError as e:  # the user's to fix: say what, without a traceback
        print(f"alignlab: error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
