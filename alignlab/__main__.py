"""`python -m alignlab [overrides]`: compose conf/ with Hydra and train."""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from alignlab.errors import AlignlabError

# Only light modules here (not alignlab.runner.config: it pulls in Lightning, seconds), so a mistyped
# override is reported at once.
from alignlab.runner.preflight import CONFIG_DIR, preflight
from alignlab.runner.sweeps import (
    discard_unstarted_run,
    holds_only_hydra_files,
    is_first_process,
    register_resolvers,
)

register_resolvers()  # conf/hydra/default.yaml names the run folder with ${alignlab.run_name:}

# Run folders given on the command line (hydra.run.dir=...) that existed before Hydra started: never removed.
EXISTING_RUN_DIRS: set[Path] = set()


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="train")
def main(cfg: DictConfig) -> float | None:
    from hydra.core.hydra_config import HydraConfig

    from alignlab.train import objective_value, train

    # A folder Hydra has just made for this job: a failure before training removes it (docs/troubleshooting.md).
    run_dir = Path(HydraConfig.get().runtime.output_dir).resolve()
    # Only the first process: under DDP the others share the folder and may stop while it trains.
    created = run_dir not in EXISTING_RUN_DIRS and holds_only_hydra_files(run_dir) and is_first_process()
    try:
        return objective_value(train(cfg), cfg.objective)  # what a search sweeper (Optuna) optimises
    except AlignlabError as e:  # the user's to fix: say what, without a traceback
        if created:
            discard_unstarted_run(run_dir)
        print(f"alignlab: error: {e}", file=sys.stderr)
        sys.exit(1)
    except BaseException:
        if created:
            discard_unstarted_run(run_dir)
        raise


def launch() -> None:
    """Check the command line (alignlab.runner.preflight), then hand it to Hydra."""
    try:
        preflight(sys.argv[1:])  # before Hydra creates the run folder and writes .hydra/ into it
    except AlignlabError as e:
        print(f"alignlab: error: {e}", file=sys.stderr)
        sys.exit(1)
    for arg in sys.argv[1:]:
        if arg.startswith("hydra.run.dir="):
            folder = Path(arg.split("=", 1)[1].strip("'\"")).expanduser()
            if folder.exists():
                EXISTING_RUN_DIRS.add(folder.resolve())
    main()


if __name__ == "__main__":
    launch()
