"""Reference log-probs computed once, before training: a callback between the module and the DataModule.

Offline algorithms with a frozen reference (DPO, KTO) can score every row with it once
(`precompute_ref_log_probs`) instead of at every step; the numbers are the same and the reference
copy's memory goes back. Data flows one way: the DataModule hands out its rows in batches, the module
scores them, and the DataModule takes the values back and carries them in every later batch. The module
never reaches into the DataModule, nor the DataModule into the module.
"""

from __future__ import annotations

import logging

import lightning as L
import torch
from lightning.pytorch.utilities.exceptions import SIGTERMException

log = logging.getLogger(__name__)


class ReferenceScoring(L.Callback):
    """At the start of training, score every row of the DataModule's splits with the module's
    reference and give the values to the DataModule, then tell the module to let its reference go.

    The module provides `check_logprobs(batch)`, `score_reference(batch) -> {name: [rows] tensor}` and
    `release_reference()`; the DataModule `scoring_batches()`, `collate_rows(split, positions)` and
    `add_row_values(split, positions, values)` (alignlab.data.datamodule.AlignmentDataModule).
    Every process scores every row (the reference is fixed, so no values need to travel between them).

    Raises:
        SIGTERMException: on a SIGTERM or SIGINT (alignlab.runner.resume.CheckpointOnSignal), after the
            current batch, as training stops; the run then ends with a checkpoint.
        RuntimeError: the trainer has no DataModule (trainer.fit(module, datamodule=...)).
    """

    @torch.no_grad()
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        datamodule = trainer.datamodule
        if datamodule is None:
            raise RuntimeError("precompute_ref_log_probs scores a DataModule's rows: fit with datamodule=...")
        batches = datamodule.scoring_batches()
        total, scored = sum(len(positions) for _, positions in batches), 0
        log.info("scoring %d rows with the reference model once (precompute_ref_log_probs)", total)
        for split, positions in batches:
            if trainer.received_sigterm:
                log.warning("stopped scoring with the reference after %d of %d rows", scored, total)
                raise SIGTERMException
            scored += len(positions)
            batch = datamodule.collate_rows(split, positions)
            batch = {k: v.to(pl_module.device) if torch.is_tensor(v) else v for k, v in batch.items()}
            pl_module.check_logprobs(batch)  # before the first scores, not at the first training batch
            datamodule.add_row_values(split, positions, pl_module.score_reference(batch))
        pl_module.release_reference()
