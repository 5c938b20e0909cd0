"""Data: the bundled task, file readers, canonical rows and the LightningDataModules."""

from alignlab.data.datamodule import (
    AlignmentDataModule,
    LabelledDataModule,
    PairwiseDataModule,
    PromptDataModule,
    SFTDataModule,
)

__all__ = ["AlignmentDataModule", "LabelledDataModule", "PairwiseDataModule", "PromptDataModule", "SFTDataModule"]
