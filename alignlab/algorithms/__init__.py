"""One LightningModule per algorithm, over the shared AlignmentModule base."""
