"""`python -m alignlab [overrides]`: compose conf/ with Hydra and train."""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from alignlab.errors import AlignlabError

# Only light modules here (not alignlab.runner.config: it pulls in Lightning, seconds), so a mistyped
# override is reported at once.
from alignlab.runner.preflight import CONFIG_DIR, preflight
from alignlab.runner.sweeps import register_resolvers

register_resolvers()  # conf/hydra/default.yaml names the run folder with ${alignlab.run_name:}


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="train")
def main(cfg: DictConfig) -> float | None:
    from alignlab.train import objective_value, train

    try:
        return objective_value(train(cfg), cfg.objective)  # what a search sweeper (Optuna) optimises
    except AlignlabError as e:  # the user's to fix: say what, without a traceback
        print(f"alignlab: error: {e}", file=sys.stderr)
        sys.exit(1)


def launch() -> None:
    """Check the command line (alignlab.runner.preflight), then hand it to Hydra."""
    try:
        preflight(sys.argv[1:])  # before Hydra creates the run folder and writes .hydra/ into it
    except AlignlabError as e:
        print(f"alignlab: error: {e}", file=sys.stderr)
        sys.exit(1)
    main()


if __name__ == "__main__":
    launch()
