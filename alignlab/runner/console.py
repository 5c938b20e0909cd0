"""What a run prints while it trains: a bar in a terminal, plain lines elsewhere, each log line once.

`progress_bar()` picks by `sys.stdout.isatty()`: `StepBar`, a tqdm bar redrawn in place, for a terminal;
`ProgressLines` for a log file, SLURM or CI, where a redrawn bar would be one endless line. Both count
optimizer steps (`trainer.global_step`) against `trainer.max_steps` and show the metrics the module logs
with `prog_bar=True` (AlignmentModule._log: the loss and each algorithm's headline metrics).
`quiet_console()` removes Lightning's second console handler and the warnings a user cannot act on.
"""

from __future__ import annotations

import logging
import sys
import time
import warnings
from collections.abc import Mapping

from lightning.pytorch.callbacks import ProgressBar, TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm, _update_n


def split_metrics(metrics: Mapping, split: str) -> dict[str, float]:
    """The `<split>/` entries of `metrics` (e.g. Lightning's progress-bar metrics), without the prefix."""
    prefix = split + "/"
    return {k[len(prefix) :]: float(v) for k, v in metrics.items() if k.startswith(prefix)}


def format_metrics(metrics: Mapping[str, float]) -> str:
    """`loss=3.871  rewards/accuracies=0.375`: four significant digits, as the summary prints them."""
    return "  ".join(f"{k}={v:.4g}" for k, v in metrics.items())


def headline(trainer, split: str) -> dict[str, float]:
    """The module's progress-bar metrics of `split` (`train`, `eval`), loss first, without the prefix."""
    metrics = split_metrics(trainer.progress_bar_metrics, split)
    return dict(sorted(metrics.items(), key=lambda item: item[0] != "loss"))


def eval_line(trainer) -> str:
    """The line a validation prints: the step it validated at and its headline eval/ metrics."""
    return f"eval  step {trainer.global_step}/{trainer.max_steps}  {format_metrics(headline(trainer, 'eval'))}"


class StepBar(TQDMProgressBar):
    """Terminal: one bar over the run's optimizer steps, `train:   4%|▍   | 37/1000 [00:12<05:10,
    3.08step/s, loss=3.87, rewards/accuracies=0.375]`, and a line per validation above it.

    Lightning's own bar restarts every epoch, counts micro-batches (not optimizer steps, with
    accumulation or PPO's several updates per rollout), and shows `Epoch 0/-2` (max_epochs=-1) and the
    logger's `v_num`. A resumed run's bar starts at its step; the ETA counts this run's steps only.
    """

    @property
    def train_description(self) -> str:
        return "train"

    def init_train_tqdm(self) -> Tqdm:
        trainer = self.trainer
        return Tqdm(
            desc=self.train_description,
            total=trainer.max_steps if trainer.max_steps > 0 else None,
            initial=trainer.global_step,
            unit="step",
            position=2 * self.process_position,
            disable=self.is_disabled,
            leave=True,
            dynamic_ncols=True,
            file=sys.stdout,
            smoothing=0,
            bar_format=self.BAR_FORMAT,
        )

    def on_train_start(self, *_) -> None:
        self._train_progress_bar = None  # made at the first batch, so its pace leaves out reference scoring

    def on_train_epoch_start(self, *_) -> None:
        pass  # one bar for the whole run (Lightning's resets it each epoch, to the epoch's batches)

    def on_train_batch_start(self, *_) -> None:
        if self._train_progress_bar is None:
            self.train_progress_bar = self.init_train_tqdm()

    def on_train_batch_end(self, trainer, pl_module, *_) -> None:
        bar, step = self.train_progress_bar, trainer.global_step
        if step != bar.n and self._should_update(step, bar.total):
            bar.set_postfix(self.get_metrics(trainer, pl_module), refresh=False)
            _update_n(bar, step)  # one redraw, with the step's metrics

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        pass  # the bar runs on over epochs: nothing to close or refresh here

    def on_train_end(self, *_) -> None:
        if self._train_progress_bar is not None:  # None: a resumed run that had no step left
            self.train_progress_bar.close()

    def on_validation_end(self, trainer, pl_module) -> None:
        super().on_validation_end(trainer, pl_module)
        if self.is_enabled:
            Tqdm.write(eval_line(trainer), file=sys.stdout)

    def get_metrics(self, trainer, pl_module) -> dict[str, float]:
        """The live train/ metrics, without the prefix (no `v_num`; eval/ values have their own line)."""
        return headline(trainer, "train")


class ProgressLines(ProgressBar):
    """Not a terminal: `step 20/1000  loss=3.871  rewards/accuracies=0.375  (5.1 s, 3.9 step/s, eta 4 min 10 s)`
    every `trainer.log_every_n_steps` optimizer steps and at the last, and `eval  step 250/1000  ...` at each
    validation. Rank zero only (Lightning disables the progress bar elsewhere)."""

    def __init__(self) -> None:
        super().__init__()
        self._enabled = True
        self._printed = -1  # the step of the last line: accumulation's micro-batches share a step
        # (time, step) at this fit's first batch: the pace leaves out one-time work before it (reference
        # scoring), and a resumed run's counts its own steps
        self._start: tuple[float, int] | None = None

    @property
    def is_enabled(self) -> bool:
        return self._enabled

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def on_train_start(self, trainer, pl_module) -> None:
        self._start, self._printed = None, trainer.global_step

    def on_train_batch_start(self, trainer, *_) -> None:
        if self._start is None:
            self._start = (time.perf_counter(), trainer.global_step)

    def on_train_batch_end(self, trainer, pl_module, *_) -> None:
        step, every = trainer.global_step, max(trainer.log_every_n_steps, 1)
        # A multiple of `every` crossed, not hit: online algorithms take several optimizer steps per batch.
        crossed = step // every > self._printed // every
        if not self._enabled or step == self._printed or not (crossed or step == trainer.max_steps):
            return
        self._printed = step
        metrics = format_metrics(headline(trainer, "train"))
        self.print(f"step {step}/{trainer.max_steps}  {metrics}  ({self.pace(step, trainer.max_steps)})", flush=True)

    def on_validation_end(self, trainer, pl_module) -> None:
        if self._enabled and not trainer.sanity_checking:
            self.print(eval_line(trainer), flush=True)

    def pace(self, step: int, max_steps: int) -> str:
        """Seconds since the first batch, steps per second and the time left at that pace (validations
        included)."""
        began, first = self._start or (time.perf_counter(), step)
        elapsed = time.perf_counter() - began
        rate = (step - first) / elapsed if elapsed > 0 else 0.0
        text = f"{elapsed:.1f} s, {rate:.3g} step/s"
        if rate > 0 and max_steps > step:
            minutes, seconds = divmod(round((max_steps - step) / rate), 60)
            text += f", eta {minutes} min {seconds} s" if minutes else f", eta {seconds} s"
        return text


def progress_bar() -> ProgressBar:
    """The run's progress display: a bar when stdout is a terminal, plain lines otherwise."""
    return StepBar() if sys.stdout.isatty() else ProgressLines()


class _DropMessages(logging.Filter):
    """Drops a logger's records whose message contains any of `parts`; every other record passes."""

    def __init__(self, *parts: str):
        super().__init__()
        self.parts = parts

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(part in message for part in self.parts)


def quiet_console() -> None:
    """Each log line once, and none of the warnings a plain run cannot act on. Idempotent (a sweep's
    jobs share a process); every filter matches one message from one module, so real warnings pass."""
    root, lightning = logging.getLogger(), logging.getLogger("lightning")
    if root.handlers:
        # `import lightning` gives its logger a console handler (`INFO: ...`) and lets records propagate
        # too; under Hydra the root's handlers (console and <run>/alignlab.log) print each line again.
        for handler in list(lightning.handlers):
            if type(handler) is logging.StreamHandler:
                lightning.removeHandler(handler)
    for name, parts in {
        # peft imports bitsandbytes (when installed, e.g. by the dev extras) through transformers'
        # scheduler helpers; its CPU backend looks for the optional `kernels` package for 4-bit matmuls.
        "bitsandbytes.backends.cpu.ops": ("Failed to load CPU gemm_4bit_forward from kernels-community",),
        "lightning.pytorch.utilities.rank_zero": (
            "💡 Tip: ",  # an advertisement for Lightning's cloud services, at every fit
            # A module's own callbacks (reference scoring, KTO's advice) replacing the copies the run's
            # previous validate/fit call attached: expected at every call after the first.
            "returned in `LightningModule.configure_callbacks` will override existing callbacks",
        ),
    }.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessages) for f in logger.filters):
            logger.addFilter(_DropMessages(*parts))
    if not sys.stdout.isatty():  # transformers' loading and saving bars: carriage-return debris in a log file
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
    # Lightning's own pytree helper builds torch's deprecated LeafSpec; nothing a user can change.
    warnings.filterwarnings(
        "ignore",
        r"`isinstance\(treespec, LeafSpec\)` is deprecated",
        FutureWarning,
        r"lightning\.pytorch\.utilities\._pytree",
    )
