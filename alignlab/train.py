"""One training run: check the config, build data/model/algorithm/trainer from it, fit, export.

Reads top to bottom; every object comes from the config with `instantiate`.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.utils import get_class, instantiate
from lightning.pytorch.callbacks import LearningRateMonitor, ProgressBar
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf

from alignlab.data.mixture import build_datamodule
from alignlab.data.truncation import model_positions
from alignlab.errors import ConfigError
from alignlab.models.loading import load_model
from alignlab.models.vision import load_image_encoder
from alignlab.runner.config import (
    ALGORITHM_META_KEYS,
    check_config,
    resolved_config,
    save_resolved_config,
    task_overrides,
)
from alignlab.runner.console import format_metrics, quiet_console, split_metrics
from alignlab.runner.loggers import finish_loggers, wandb_identity
from alignlab.runner.resume import LAST, CheckpointOnSignal, RunInterrupted, resume_checkpoint
from alignlab.runner.steps import check_optimizer_steps, check_trainer_steps
from alignlab.runner.sweeps import STOPPED_FILES, current_job, name_run

log = logging.getLogger(__name__)


def build_algorithm(cfg: DictConfig, model, tokenizer) -> L.LightningModule:
    """The algorithm's LightningModule: its config minus metadata keys are constructor arguments."""
    hparams = {k: v for k, v in cfg.algorithm.items() if k not in ALGORITHM_META_KEYS}
    try:
        return instantiate(
            hparams,
            model=model,
            tokenizer=tokenizer,
            optim=OmegaConf.to_container(cfg.optim),
            evaluation=OmegaConf.to_container(cfg.evaluation),
            _recursive_=False,
            _convert_="all",
        )  # plain containers, so checkpoints load with weights_only=True
    except Exception as e:  # what only the loaded tokenizer shows (e.g. a chat template's tool-call format)
        if isinstance(e.__cause__, ConfigError):
            raise e.__cause__ from None
        raise


def train(cfg: DictConfig) -> dict:
    """One run of `cfg`: check it, build data, model, algorithm and trainer, fit, export, write and print
    summary.json, and return the summary (a resumed run with no step left: its own, see finished_run).

    Raises:
        ConfigError, DataError, ModelLoadError: before anything is written to the run folder.
        RunInterrupted: stopped on a signal (last.ckpt written; resume=auto continues it)."""
    start = time.perf_counter()
    check_before_start(cfg)
    run_dir = Path(cfg.paths.output_dir)
    ckpt_path = resume_checkpoint(cfg.resume, run_dir)
    if ckpt_path and (finished := finished_run(run_dir, Path(ckpt_path), cfg.trainer.max_steps)) is not None:
        return finished  # nothing left to train: the run's own summary stands, unrewritten
    datamodule = build_datamodule(cfg.data)
    datamodule.read()  # bad data fails here, before anything is written to the run folder
    get_class(cfg.algorithm._target_).check_rows(cfg.algorithm, datamodule)  # e.g. a column a reward function needs
    L.seed_everything(cfg.seed, workers=True, verbose=False)

    model, tokenizer, model_path = load_model(cfg.model, require_chat_template=cfg.algorithm.requires_chat_template)
    set_up_data(cfg, datamodule, model, tokenizer, model_path)
    if rank_zero_only.rank == 0:  # under ddp every process runs this function; one writes the folder
        save_resolved_config(cfg, run_dir / ("config.yaml" if not ckpt_path else "config.resumed.yaml"))
    module = build_algorithm(cfg, model, tokenizer)
    overrides = task_overrides()
    loggers = build_loggers(cfg, overrides)
    trainer, validate = build_trainer(cfg, module, datamodule, loggers, run_dir)

    fit(trainer, module, datamodule, loggers, run_dir, ckpt_path, validate and cfg.evaluation.at_start)
    save_last_checkpoint(trainer)
    metrics = final_metrics(trainer, module, datamodule, validate)
    wandb_run = wandb_identity(loggers)
    finish_loggers(loggers)
    model_dir = export_model(cfg, trainer, module, run_dir)
    result = {
        "algorithm": cfg.algorithm.name,
        "run_dir": str(run_dir),
        "model_dir": str(model_dir) if model_dir else None,
        "run_name": cfg.run_name,
        "overrides": overrides,
        "wandb": wandb_run,
        "start_model": model_path,
        "steps": trainer.global_step,
        "seconds": round(time.perf_counter() - start, 1),
        **data_summary(datamodule),
        "metrics": metrics,
        "warnings": list(getattr(module, "run_warnings", [])),  # e.g. GRPO's rollouts without reward signal
    }
    write_summary(trainer, run_dir, result)
    return result


def check_before_start(cfg: DictConfig) -> None:
    """Before anything slow: a wrong config fails in a second. Then the console quietened and the run
    named (a sweep's jobs after their overrides, grouped by sweep).

    Raises:
        ConfigError: a key wrong (check_config), or a trainer that takes no optimizer step.
    """
    choices = dict(HydraConfig.get().runtime.choices) if HydraConfig.initialized() else {}
    check_config(cfg, choices)
    check_trainer_steps(cfg.trainer)  # trainer.max_steps=0 and the like: no optimizer step
    quiet_console()
    name_run(cfg, current_job())


def set_up_data(cfg: DictConfig, datamodule, model, tokenizer, model_path: str) -> None:
    """Every row through the loaded model's chat template and max_length (bad rows fail here, before
    anything is written); config.yaml then records the length max_length=auto chose.

    Raises:
        ConfigError: rows with images for an algorithm that does not train on them, or a train split
            too small for one optimizer step (check_optimizer_steps). DataError: bad rows.
    """
    datamodule.set_tokenizer(tokenizer)
    datamodule.set_image_encoder(load_image_encoder(model, tokenizer, model_path))
    datamodule.set_max_positions(model_positions(model.config))
    datamodule.setup()
    if datamodule.auto_length:
        cfg.data.max_length = datamodule.max_length
    if datamodule.has_images and not get_class(cfg.algorithm._target_).trains_on_images:
        raise ConfigError(
            f"algorithm={cfg.algorithm.name} does not train on rows with images yet; vision-language models train "
            "with sft, dpo, kto, rm, cpo, orpo, simpo and grpo"
        )
    check_optimizer_steps(cfg, datamodule)  # a run that would take no optimizer step stops here


def build_loggers(cfg: DictConfig, overrides: list[str]) -> list:
    """The config's loggers, each given the resolved config and the command line's overrides."""
    loggers = [instantiate(c) for c in (cfg.get("logger") or {}).values()]
    for logger in loggers:
        logger.log_hyperparams({**resolved_config(cfg), "overrides": overrides})
    return loggers


def build_trainer(cfg: DictConfig, module, datamodule, loggers: list, run_dir: Path) -> tuple[L.Trainer, bool]:
    """(the Lightning Trainer, whether it validates): the config's callbacks less those Lightning would
    refuse, plus CheckpointOnSignal; clipping and accumulation left to a manually optimised module;
    validation off (with one warning) when the data holds no rows out."""
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values()]
    if not loggers:  # logger=none: nothing to monitor the learning rate into (Lightning refuses to start)
        callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
    if not cfg.trainer.enable_progress_bar:  # silences callbacks.progress too (Lightning refuses both)
        callbacks = [c for c in callbacks if not isinstance(c, ProgressBar)]
    callbacks.append(CheckpointOnSignal(run_dir / LAST.parent))
    manual = {}
    if not module.automatic_optimization:
        # Lightning clips and accumulates only under automatic optimisation; such a module does both itself.
        module.max_grad_norm = cfg.trainer.gradient_clip_val
        manual = {"gradient_clip_val": None, "accumulate_grad_batches": 1}
    validate = datamodule.has_eval_rows
    no_validation = {} if validate else {"limit_val_batches": 0}  # Lightning then skips every scheduled validation
    if not validate:
        if hasattr(module, "num_sample_generations"):
            module.num_sample_generations = 0  # PPO/GRPO sample tables answer held-out prompts
        if rank_zero_only.rank == 0:
            train_rows = datamodule.read()["train"]
            log.warning("%s", no_validation_message(cfg, len(train_rows) if isinstance(train_rows, list) else None))
    trainer = instantiate(cfg.trainer, logger=loggers or False, callbacks=callbacks, **manual, **no_validation)
    return trainer, validate


def fit(trainer, module, datamodule, loggers: list, run_dir: Path, ckpt_path, validate_first: bool) -> None:
    """Validate the starting model (`validate_first`, not on resume), then fit, the run folder marked
    if it stops early.

    Raises:
        RunInterrupted: stopped on a signal, after CheckpointOnSignal wrote last.ckpt.
    """
    if validate_first and not ckpt_path:
        trainer.validate(module, datamodule=datamodule, verbose=False)
    with marked_if_stopped(run_dir, trainer):
        try:
            trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
        except SIGTERMException:  # CheckpointOnSignal has written last.ckpt
            finish_loggers(loggers)
            raise RunInterrupted(
                f"stopped on a signal at step {trainer.global_step}; checkpoint {run_dir / LAST}. Continue with the "
                f"same command plus resume=auto hydra.run.dir={run_dir} (or resume={run_dir / LAST})"
            ) from None


def export_model(cfg: DictConfig, trainer, module, run_dir: Path) -> Path | None:
    """<run>/model with cfg.save_model (None without): the trained model as module.save_final writes it."""
    if not cfg.save_model:
        return None
    # Sharded strategies hold a slice of each weight per process: gather them (every process takes
    # part) and save from the whole tensors. Other strategies save the live model as it is.
    whole = trainer.strategy.lightning_module_state_dict() if is_sharded(trainer.strategy) else None
    if trainer.is_global_zero:
        module.save_final(run_dir, cfg.model.lora.merge, whole)
    trainer.strategy.barrier()  # every process returns once the model is on disk
    return run_dir / "model"


def data_summary(datamodule) -> dict:
    """The summary's account of rows left out, skipped or shortened, per split."""
    return {
        "dropped_rows": dict(datamodule.dropped),
        "dropped_rows_by_reason": dict(datamodule.dropped_by_reason),
        "skipped_bad_rows": datamodule.skipped,
        "shortened_prompts": dict(datamodule.shortened),  # per split, by data.truncation=keep_end/keep_start
    }


def finished_run(run_dir: Path, checkpoint: Path, max_steps: int) -> dict | None:
    """The summary of the run in `run_dir` when resuming it from its own checkpoint would train no step:
    it finished (summary.json, no stop mark) at `max_steps` or beyond. A resumed fit with no step left
    would rewrite summary.json without the train metrics of the steps it did not take, so the run's own
    summary is printed and returned instead. None when there is training left (or no such summary)."""
    summary = run_dir / "summary.json"
    if checkpoint.resolve() != (run_dir / LAST).resolve() or not summary.is_file():
        return None
    if any((run_dir / name).exists() for name in STOPPED_FILES.values()):
        return None
    result = json.loads(summary.read_text())
    if result.get("steps", -1) < max_steps:
        return None
    if rank_zero_only.rank == 0:
        print(
            f"alignlab: the run in {run_dir} already finished {result['steps']} steps (trainer.max_steps="
            f"{max_steps}); nothing to resume, summary.json is kept. To train on, raise trainer.max_steps.",
            flush=True,
        )
        print_summary(result)
    return result


@contextmanager
def marked_if_stopped(run_dir: Path, trainer) -> Iterator[None]:
    """Training inside marks the run folder when it stops early (alignlab.runner.sweeps.STOPPED_FILES):
    `INTERRUPTED` for a signal or Ctrl-C (resumable), `FAILED` with the error for anything else; the
    error is re-raised. The folder keeps its checkpoints. A resumed run first clears an old mark."""
    if rank_zero_only.rank == 0:
        for name in STOPPED_FILES.values():
            (run_dir / name).unlink(missing_ok=True)
    try:
        yield
    except BaseException as e:
        if rank_zero_only.rank == 0:
            stopped = isinstance(e, RunInterrupted | KeyboardInterrupt | SystemExit)
            status = "interrupted" if stopped else "failed"
            message = f"{status} at step {trainer.global_step}: {type(e).__name__}: {e}\n"
            (run_dir / STOPPED_FILES[status]).write_text(message)
        raise


def final_metrics(trainer, module, datamodule, validate: bool) -> dict[str, float]:
    """The summary's metrics: the last train/ values and the final model's eval/ ones, by name.

    Validates the final model when the last in-training validation was not at the last step. Lightning
    empties `trainer.callback_metrics` at the start of every `validate` call, so the values fit left there
    (train/, and eval/ of an earlier step) are read first and the closing validation's eval/ replace them.
    """
    metrics = dict(trainer.callback_metrics)
    if validate and getattr(module, "validated_at", None) != trainer.global_step:
        trainer.validate(module, datamodule=datamodule, verbose=False)
        metrics.update(trainer.callback_metrics)
    return {k: float(v) for k, v in sorted(metrics.items())}


def no_validation_message(cfg: DictConfig, train_rows: int | None) -> str:
    """What a run without held-out rows says, once: why, and how to get validation back (`train_rows`:
    None for a stream, whose length is unknown)."""
    fraction = cfg.data.source.get("eval_fraction")
    why = "the data has one row" if train_rows == 1 and fraction else f"data.source.eval_fraction={fraction}"
    key = "data.source"
    if train_rows is None:
        why = "data.source.streaming=true holds no fraction of the stream out"
    elif cfg.data.get("sources"):  # a mixture: each spec holds its own rows out
        why, key = "no source of data.sources holds rows out", "data.sources[i]"
    return (
        f"no held-out rows ({why}), so this run trains without validation and reports no eval/ metrics; "
        f"to validate, hold rows out with {key}.eval_fraction > 0 on a file of 2 or more rows, or give "
        f"{key}.eval_path (or {key}.eval_split for a folder or Hub data set)"
    )


def is_sharded(strategy) -> bool:
    from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy

    return isinstance(strategy, (FSDPStrategy, DeepSpeedStrategy))


def objective_value(result: dict, objective: str | None) -> float | None:
    """The final value of the metric a search optimises (`objective`), or None when none is named."""
    if objective is None:
        return None
    if objective not in result["metrics"]:
        raise ConfigError(f"objective={objective!r} is not among this run's final metrics: {sorted(result['metrics'])}")
    return result["metrics"][objective]


def save_last_checkpoint(trainer) -> None:
    """last.ckpt at the final step: checkpointing every N steps would otherwise miss the tail of a run."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    for callback in trainer.callbacks:
        if isinstance(callback, ModelCheckpoint) and callback.save_last and callback.dirpath:
            trainer.save_checkpoint(str(Path(callback.dirpath) / "last.ckpt"), weights_only=False)  # resumable
            return


def write_summary(trainer, run_dir: Path, result: dict) -> None:
    """<run>/summary.json, and the summary printed: by the main process alone."""
    if trainer.is_global_zero:
        (run_dir / "summary.json").write_text(json.dumps(result, indent=2))
        print_summary(result)


def print_summary(result: dict) -> None:
    lines = [
        f"alignlab: {result['algorithm']} finished {result['steps']} steps in {result['seconds']} s",
        f"  run folder:  {result['run_dir']}",
    ]
    if result["model_dir"]:
        lines.append(f"  final model: {result['model_dir']}")
    for split in ("train", "eval"):
        if shown := split_metrics(result["metrics"], split):
            lines.append(f"  {split + ':':<6} " + format_metrics(shown))
    lines += [f"  warning: {warning}" for warning in result.get("warnings", [])]
    print("\n".join(lines), flush=True)
