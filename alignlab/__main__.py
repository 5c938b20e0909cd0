"""`python -m alignlab [overrides]`: compose conf/ with Hydra and train."""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from alignlab.config import CONFIG_DIR
from alignlab.errors import AlignlabError


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="train")
def main(cfg: DictConfig) -> float | None:
    from alignlab.train import objective_value, train

    try:
        return objective_value(train(cfg), cfg.objective)  # what a search sweeper (Optuna) optimises
    except AlignlabError as e:  # the user's to fix: say what, without a traceback
        print(f"alignlab: error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
