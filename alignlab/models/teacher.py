"""A frozen teacher for distillation (GKD), and the check that it shares the student's tokenizer.

A token-level distillation loss compares the two models' next-token distributions position by position,
so both must read the same token ids and give logits over the same vocabulary. `check_same_tokenizer`
says so before either model loads, from the tokenizer files and the configs' vocab_size alone.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from omegaconf import DictConfig

from alignlab.errors import ConfigError
from alignlab.models.loading import (
    check_hub_path,
    is_hub_id,
    prepare_tokenizer,
    resolve_model_path,
    tokenizer_from_pretrained,
)
from alignlab.models.reference import Frozen


def _vocab_size(path: str, trust_remote_code: bool) -> int | None:
    """The logit width a model folder's config declares (its text model's, for a vision-language one)."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError):
        return None  # the model's loading says what is wrong with the folder
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return getattr(text, "vocab_size", None)


def _differences(student: dict[str, int], teacher: dict[str, int], shown: int = 5) -> str:
    """A few tokens whose ids differ, or that only one of the vocabularies has."""
    out = []
    for token in sorted(student.keys() | teacher.keys(), key=lambda t: (student.get(t, -1), teacher.get(t, -1))):
        a, b = student.get(token), teacher.get(token)
        if a != b:
            out.append(f"{token!r}: student {a if a is not None else 'none'}, teacher {b if b is not None else 'none'}")
        if len(out) == shown:
            break
    return "; ".join(out)


def check_same_tokenizer(model_cfg: DictConfig, teacher: str | None, require_chat_template: bool, key: str) -> None:
    """Before any model loads: `teacher` (the config key `key`) is a folder or a reachable Hub id whose
    tokenizer maps every token to the same id as the tokenizer the student runs with (its chat template
    installed, as alignlab.models.loading.prepare_tokenizer gives it), and whose config declares the same
    vocab_size (logit width) as the student's.

    Raises:
        ConfigError: no teacher given, no such folder, or tokenizers or vocabulary sizes that differ,
            naming `key`. ModelLoadError: a tokenizer that does not load, a Hub id offline.
    """
    if not teacher:
        raise ConfigError(f"{key} is not set: give the teacher model's folder (e.g. a run's <run>/model) or Hub id")
    path = os.fspath(teacher)
    if not Path(path).expanduser().exists():
        if not is_hub_id(path):
            raise ConfigError(f"{key}={path}: no such folder (relative paths start from {Path.cwd()})")
        check_hub_path(path)
    student_path = resolve_model_path(model_cfg)
    student = prepare_tokenizer(student_path, model_cfg, require_chat_template)[0].get_vocab()
    teacher_vocab = tokenizer_from_pretrained(path, trust_remote_code=model_cfg.trust_remote_code).get_vocab()
    if student != teacher_vocab:
        raise ConfigError(
            f"{key}={path}: the teacher's tokenizer differs from the student's ({student_path}): "
            f"{len(teacher_vocab)} tokens against {len(student)}; {_differences(student, teacher_vocab)}. "
            "Distillation compares next-token distributions token by token, so both models need one tokenizer: "
            "pick a teacher of the student's family (for the tiny model, a run started from it, <run>/model)"
        )
    widths = _vocab_size(student_path, model_cfg.trust_remote_code), _vocab_size(path, model_cfg.trust_remote_code)
    if None not in widths and widths[0] != widths[1]:
        raise ConfigError(
            f"{key}={path}: the teacher's config has vocab_size {widths[1]}, the student's {widths[0]}: their "
            "logits cover different vocabularies, which distillation compares token by token"
        )


def load_teacher(folder: str, dtype: torch.dtype, trust_remote_code: bool = False) -> Frozen:
    """The causal LM in `folder`, in `dtype`, frozen (eval mode, no gradients) and kept outside the
    LightningModule's tree (alignlab.models.reference.Frozen). Raises what from_pretrained raises."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        folder, dtype=dtype, trust_remote_code=trust_remote_code, use_safetensors=True
    )
    return Frozen(model)
