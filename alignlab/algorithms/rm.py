"""Reward modelling: a causal LM plus a scalar value head, trained with the Bradley-Terry loss."""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig

from alignlab.algorithms.base import AlignmentModule
from alignlab.errors import ConfigError
from alignlab.losses.reward import bradley_terry_loss
from alignlab.models.export import save_model, submodule_state
from alignlab.models.reward import VALUE_HEAD_FILE, RewardModel
from alignlab.models.vision import is_multimodal
from alignlab.runner.checks import Checks

EXPORT_FORMATS = ("value_head", "seq_cls")


class RM(AlignmentModule):
    """loss = −log σ(r_c − r_r − m) + center_rewards_coefficient · (r_c + r_r)², r at the last answer token.

    The optional per-row margin m comes from the data's `margin` column.
    """

    generates = False

    def __init__(self, model, tokenizer, optim, evaluation=None, **hparams):
        seq_cls = hparams.get("export_format") == "seq_cls"
        if seq_cls and is_multimodal(model):
            raise ConfigError(
                "algorithm.export_format=seq_cls: a vision-language reward model has no "
                "AutoModelForSequenceClassification to export to; use value_head"
            )
        # seq_cls: a value head without a bias, as transformers' `score` layer, so the export scores exactly the same
        super().__init__(RewardModel(model, bias=not seq_cls), tokenizer, optim, evaluation, **hparams)

    @classmethod
    def check_config(cls, algorithm: DictConfig) -> None:
        Checks(algorithm, "algorithm").non_negative("center_rewards_coefficient").one_of(
            "export_format", EXPORT_FORMATS
        )

    def compute(self, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        n = self.rows_in(batch)
        rewards = self.model(batch["input_ids"], batch["attention_mask"], batch["loss_mask"], batch)
        chosen, rejected = rewards[:n], rewards[n:]
        loss = bradley_terry_loss(
            chosen, rejected, batch.get("margin"), self.center_rewards_coefficient, *self.step_count(batch, "rows")
        )
        detached = rewards.detach()
        return loss, {
            "accuracy": (chosen > rejected).float().mean(),
            "margin": (chosen - rejected).detach().mean(),
            "rewards/chosen": chosen.detach().mean(),
            "rewards/rejected": rejected.detach().mean(),
            "reward/mean": detached.mean(),
            "reward/min": detached.min(),
            "reward/max": detached.max(),
        }

    def save_final(self, run_dir: Path, merge_lora: bool = True, state_dict: dict | None = None) -> Path:
        """`export_format: value_head`: the backbone as a Hugging Face model (or adapter), with
        value_head.safetensors beside it. `seq_cls`: <run>/model a one-label
        AutoModelForSequenceClassification (LoRA merged in, whatever model.lora.merge says), while
        <run>/adapter, with LoRA, keeps the adapter and value_head.safetensors."""
        backbone = submodule_state(state_dict, "model.backbone.")
        head = submodule_state(state_dict, "model.value_head.")
        seq_cls = self.export_format == "seq_cls"
        folder = save_model(self.model.backbone, self.tokenizer, run_dir, merge_lora or seq_cls, backbone)
        for place in {folder, Path(run_dir) / "adapter"}:
            if place.exists():
                self.model.save_value_head(place, head)
        if seq_cls:
            (folder / VALUE_HEAD_FILE).unlink()
            self.model.save_seq_cls(folder, self.tokenizer, head)
        return folder
