"""What a run prints: a step bar in a terminal, plain lines in a file, each log line once, no noise."""

from __future__ import annotations

import json
import re
from types import SimpleNamespace

import lightning as L
import torch
from torch.utils.data import DataLoader

from alignlab.runner.console import ProgressLines, StepBar
from alignlab.runner.loggers import csv_logger
from tests.conftest import ROOT, run_cli


class Toy(L.LightningModule):
    """Logs as AlignmentModule._log does: train/ per step, eval/ per validation, headline ones on the bar."""

    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)

    def training_step(self, batch, batch_idx):
        loss = self.layer(batch).pow(2).mean()
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/not_on_the_bar", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        self.log("eval/loss", self.layer(batch).pow(2).mean(), prog_bar=True)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        return DataLoader(torch.randn(64, 2, generator=torch.Generator().manual_seed(0)), batch_size=4)

    def val_dataloader(self):
        return DataLoader(torch.randn(8, 2, generator=torch.Generator().manual_seed(1)), batch_size=4)


def fit_toy(progress, logger, callbacks=(), max_steps=5) -> L.Trainer:
    """5 optimizer steps of 2 micro-batches each, validating every 2 steps, metrics logged every 2."""
    trainer = L.Trainer(
        max_steps=max_steps,
        accumulate_grad_batches=2,
        val_check_interval=4,  # micro-batches: every 2 optimizer steps
        log_every_n_steps=2,
        num_sanity_val_steps=0,
        logger=logger,
        callbacks=[progress, *callbacks],
        enable_checkpointing=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    trainer.fit(Toy())
    return trainer


def test_terminal_bar_counts_optimizer_steps_without_epoch_or_version(tmp_path, capsys):
    bar = StepBar()
    trainer = fit_toy(bar, csv_logger(str(tmp_path), flush_logs_every_n_steps=2))
    out = capsys.readouterr().out
    assert trainer.global_step == 5 and "5/5" in out and "step/s" in out  # optimizer steps, not 10 micro-batches
    assert re.search(r"^train: .*loss=", out.replace("\r", "\n"), re.M)
    assert "Epoch" not in out and "v_num" not in out and "not_on_the_bar" not in out
    assert set(bar.get_metrics(trainer, trainer.lightning_module)) == {"loss"}  # no prefix, no v_num, no eval/
    assert re.search(r"^eval  step 2/5  loss=", out.replace("\r", "\n"), re.M)


def test_plain_lines_every_log_every_n_steps_and_at_each_validation(tmp_path, capsys):
    on_disk = {}

    class ReadMetricsFile(L.Callback):
        def on_train_batch_end(self, trainer, *_):
            path = tmp_path / "metrics.csv"
            on_disk[trainer.global_step] = path.read_text().count("\n") if path.exists() else 0

    fit_toy(ProgressLines(), csv_logger(str(tmp_path), flush_logs_every_n_steps=2), [ReadMetricsFile()])
    lines = capsys.readouterr().out.splitlines()
    steps = [line.split("  ")[0] for line in lines if line.startswith("step ")]
    assert steps == ["step 2/5", "step 4/5", "step 5/5"]  # every 2 optimizer steps, and the last
    assert all(re.search(r"  loss=[-\d.e]+  \(.* s, .* step/s", line) for line in lines if line.startswith("step "))
    assert [line.split("  loss=")[0] for line in lines if line.startswith("eval")] == [
        "eval  step 2/5",
        "eval  step 4/5",
    ]
    assert not [line for line in lines if "not_on_the_bar" in line or "v_num" in line]
    # metrics.csv reaches the disk at the lines' cadence (Lightning's default: every 100 steps)
    assert on_disk[1] == 0 and on_disk[3] > 1


def test_plain_lines_follow_steps_that_jump():
    """PPO and GRPO take several optimizer steps per batch: a line when a multiple is crossed."""
    printed = []
    lines = ProgressLines()
    lines.print = lambda text, **_: printed.append(text.split("  ")[0])
    trainer = SimpleNamespace(global_step=0, log_every_n_steps=5, max_steps=9, progress_bar_metrics={})
    lines.on_train_start(trainer, None)
    for step in (3, 3, 6, 9):
        trainer.global_step = step
        lines.on_train_batch_end(trainer, None)
    assert printed == ["step 6/9", "step 9/9"]


NOISE = (
    "kernels-community",  # bitsandbytes' optional CPU kernels
    "LeafSpec",  # torch's pytree deprecation, reached through Lightning
    "in eval mode at the start of training",
    "💡 Tip",
    "Epoch 0/",
    "v_num",
    "INFO: ",  # Lightning's own console handler, beside Hydra's
    "Loading weights",  # transformers' bars: carriage-return debris in a file
)


def test_a_run_to_a_file_prints_progress_eval_lines_and_a_summary_with_train_and_eval(tmp_path):
    run = tmp_path / "run"
    args = ["trainer.max_steps=6", "trainer.log_every_n_steps=2", "trainer.val_check_interval=4", "logger=csv"]
    small = ["data.source.n_train=128", "data.source.n_eval=16", "save_model=false", f"hydra.run.dir={run}"]
    result = run_cli([*args, *small], cwd=ROOT)
    assert result.returncode == 0, result.stderr
    out, both = result.stdout, result.stdout + result.stderr
    assert re.findall(r"^step (\d)/6  loss=[-\d.e]+  rewards/accuracies=", out, re.M) == ["2", "4", "6"]
    # before training, in training, and the closing validation of the final model (6 is no multiple of 4)
    assert re.findall(r"^eval  step (\d)/6  loss=.*exact_match=", out, re.M) == ["0", "4", "6"]
    summary = json.loads((run / "summary.json").read_text())["metrics"]
    assert {"train/loss", "train/rewards/accuracies", "eval/loss", "eval/exact_match"} <= set(summary)
    assert re.search(r"^  train: .*loss=", out, re.M) and re.search(r"^  eval: .*exact_match=", out, re.M)
    messages = [line.split("] - ", 1)[1] for line in both.splitlines() if "] - " in line]
    assert len(messages) == len(set(messages)) and any("GPU available" in m for m in messages), messages
    assert not [noise for noise in NOISE if noise in both], both
