"""Interrupted runs resume where they stopped.

A checkpoint already holds the weights, optimizer, scheduler and loop counters (Lightning) and the
position in the training order (alignlab.data.order); this module adds the random number generators,
finds the checkpoint `resume=auto` means, and turns SIGTERM/SIGINT into a checkpoint and a clean exit.
"""

from __future__ import annotations

import logging
import random
import signal
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities.exceptions import SIGTERMException

from alignlab.errors import AlignlabError, ConfigError

log = logging.getLogger(__name__)

LAST = Path("checkpoints") / "last.ckpt"


class RunInterrupted(AlignlabError):
    """The run stopped on a signal after writing a checkpoint it can resume from."""


def rng_state() -> dict:
    """Every generator training draws from, in types a weights-only checkpoint load accepts."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(_as_tuple(state["python"]))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(value):
    return tuple(_as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value


def resume_checkpoint(resume: str | None, run_dir: Path) -> str | None:
    """The checkpoint `resume` names. null: none, and the folder must not already hold a run; `auto`:
    this run folder's last.ckpt if there is one (a rerun of the same command with the same
    hydra.run.dir, e.g. a requeued job), else none; a path: that file, which must exist."""
    if resume in (None, ""):
        if (run_dir / LAST).is_file():  # starting afresh here would overwrite that run's checkpoints
            raise ConfigError(
                f"the run folder {run_dir} already holds a run ({LAST}); continue it with resume=auto, "
                "or choose another hydra.run.dir"
            )
        return None
    if resume == "auto":
        last = run_dir / LAST
        if last.is_file():
            log.info("resume=auto: continuing from %s", last)
            return str(last)
        log.info("resume=auto: no checkpoint in %s yet; starting a new run", run_dir)
        return None
    if not Path(resume).is_file():
        raise ConfigError(f"resume={resume}: no such checkpoint file (give a .ckpt path, 'auto' or null)")
    return str(resume)


class CheckpointOnSignal(L.Callback):
    """SIGTERM (Lightning stops after the current batch) or SIGINT (made to act the same) writes
    <run>/checkpoints/last.ckpt at a batch boundary; the run then ends with RunInterrupted.

    Two details keep a resumed run's metric history equal to a straight run's. A signal that arrives
    during a validation inside training is held until the validation ends, so its metrics cover every
    held-out batch (Lightning would stop after the batch at hand, and a resumed run would finish the
    validation without the batches already seen). And when the boundary the run stops at had a
    validation, Lightning's restart skips that validation and counts the boundary's logging step once
    more, so the checkpoint holds that count one lower.
    """

    def __init__(self, dirpath: str | Path):
        self.path = Path(dirpath) / "last.ckpt"
        self._previous_sigint = None
        self._held = False  # a signal seen during a validation inside training, not yet passed on
        self._validated_here = False  # a validation ran after the last training batch
        self._saving = False

    def on_fit_start(self, trainer, pl_module) -> None:
        def stop_after_this_batch(signum, frame):
            log.warning("SIGINT: stopping after the current batch and writing a checkpoint (again to abort)")
            signal.signal(signal.SIGINT, self._previous_sigint)  # a second Ctrl-C aborts at once
            trainer._signal_connector.received_sigterm = True

        try:
            self._previous_sigint = signal.signal(signal.SIGINT, stop_after_this_batch)
        except ValueError:  # not the main thread: leave SIGINT alone
            self._previous_sigint = None

    def _restore_sigint(self) -> None:
        if self._previous_sigint is not None:
            signal.signal(signal.SIGINT, self._previous_sigint)
            self._previous_sigint = None

    def on_train_batch_end(self, trainer, *args) -> None:
        self._validated_here = False

    def on_validation_batch_end(self, trainer, *args) -> None:
        if trainer.state.fn == "fit" and not trainer.sanity_checking and trainer._signal_connector.received_sigterm:
            trainer._signal_connector.received_sigterm = False  # held: the validation runs to its end
            self._held = True

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.state.fn != "fit" or trainer.sanity_checking:
            return
        self._validated_here = True
        if self._held:  # Lightning stops once this boundary's bookkeeping is done
            trainer._signal_connector.received_sigterm, self._held = True, False

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        if self._saving and self._validated_here:
            loop = checkpoint["loops"]["fit_loop"]["epoch_loop.state_dict"]
            loop["_batches_that_stepped"] -= 1  # the restart adds it back as it skips this boundary's validation

    def on_fit_end(self, trainer, pl_module) -> None:
        self._restore_sigint()

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self._restore_sigint()
        if isinstance(exception, SIGTERMException):
            self._saving = True
            try:
                trainer.save_checkpoint(str(self.path))
            finally:
                self._saving = False
            log.warning("stopped on a signal at step %d; checkpoint written to %s", trainer.global_step, self.path)
