"""The check that a second model (a DPO/KTO reference, a GKD teacher) reads the policy's token ids.

Comparing two models answer by answer (log π − log π_ref) or position by position (a distillation
loss) only means something when both map every token to the same id; a distillation loss also needs
logits of the same width. `check_same_tokenizer` says so from the tokenizer and config files alone,
before either model loads, so a wrong pairing fails in a second instead of after minutes of loading,
or silently (a reference whose ids are shifted still gives numbers).
"""

from __future__ import annotations

import os
from pathlib import Path

from omegaconf import DictConfig

from alignlab.errors import ConfigError
from alignlab.models.loading import (
    check_hub_path,
    is_hub_id,
    prepare_tokenizer,
    resolve_model_path,
    tokenizer_from_pretrained,
)

__all__ = ["check_ref_model", "check_same_tokenizer"]


def check_same_tokenizer(
    model_cfg: DictConfig,
    other: str | None,
    key: str,
    *,
    require_chat_template: bool,
    names: tuple[str, str] = ("policy", "reference model"),
    same_logit_width: bool = False,
) -> None:
    """Before any model loads: `other` (the config value `key`), a folder or a Hub id, has a tokenizer
    that maps every token to the same id as the tokenizer the policy runs with (`model_cfg`'s, with its
    chat template installed and the template's markers added, as `prepare_tokenizer` gives it: so a
    reference saved by an SFT run that added them matches, and a raw Hub model without them does not).
    With `same_logit_width`, the configs' vocab_size must agree too, the policy's counted after the
    added tokens grow its embeddings (alignlab.models.loading.grow_embeddings).

    Args:
        names: what the two models are called in the error, the policy first (e.g. "student", "teacher").

    Raises:
        ConfigError: `other` unset, not an existing folder nor a Hub id, holding no tokenizer that loads,
            or a vocabulary (or logit width) that differs; the error names `key` and a few tokens whose
            ids differ.
        ModelLoadError: a Hub id while offline and not cached.
    """
    ours_name, theirs_name = names
    path = _existing_path(other, key, theirs_name)
    policy_path = resolve_model_path(model_cfg)
    tokenizer = prepare_tokenizer(policy_path, model_cfg, require_chat_template)[0]
    ours = tokenizer.get_vocab()
    try:
        theirs = tokenizer_from_pretrained(path, trust_remote_code=model_cfg.trust_remote_code).get_vocab()
    except (OSError, ValueError) as e:
        raise ConfigError(f"{key}={path} holds no tokenizer that loads ({e})") from None
    if ours != theirs:
        raise ConfigError(
            f"{key}={path}: the {theirs_name}'s tokenizer differs from the {ours_name}'s ({policy_path}): "
            f"{len(theirs)} tokens against {len(ours)}; {_differences(ours, theirs, names)}. Both models must read "
            f"the same token ids: use a {theirs_name} of the {ours_name}'s family (for the tiny model, a run started "
            "from it, <run>/model)"
        )
    if same_logit_width:
        _check_logit_width(model_cfg, policy_path, len(tokenizer), path, key, names)


def _existing_path(other: str | None, key: str, theirs_name: str) -> str:
    """`other` as a path: an existing folder, or a Hub id that is reachable or cached.

    Raises:
        ConfigError: unset, or neither a folder nor a Hub id. ModelLoadError: a Hub id offline, not cached.
    """
    if not other:
        raise ConfigError(f"{key} is not set: give the {theirs_name}'s folder (e.g. a run's <run>/model) or Hub id")
    path = os.fspath(other)
    if not Path(path).expanduser().exists():
        if not is_hub_id(path):
            raise ConfigError(f"{key}={path}: no such folder (relative paths start from {Path.cwd()})")
        check_hub_path(path)
    return path


def _check_logit_width(model_cfg: DictConfig, policy_path: str, tokens: int, path: str, key: str, names) -> None:
    """The configs of the policy (grown to its tokenizer's `tokens`) and of `path` declare one vocab_size;
    not checked when either declares none.

    Raises:
        ConfigError: they differ.
    """
    ours_name, theirs_name = names
    declared = _vocab_size(policy_path, model_cfg.trust_remote_code), _vocab_size(path, model_cfg.trust_remote_code)
    if None not in declared:
        width = max(declared[0], tokens)  # added template markers grow the policy's embeddings
        if width != declared[1]:
            raise ConfigError(
                f"{key}={path}: the {theirs_name}'s config has vocab_size {declared[1]}, the {ours_name}'s "
                f"{width}: their logits cover different vocabularies, which are compared token by token"
            )


def check_ref_model(cfg: DictConfig) -> None:
    """`algorithm.ref_model`, when set, reads the policy's token ids (check_same_tokenizer); DPO, KTO and
    PPO run it before any model loads. Raises what check_same_tokenizer raises."""
    algorithm = cfg.algorithm
    if algorithm.get("ref_model") is not None:
        required = algorithm.requires_chat_template
        check_same_tokenizer(cfg.model, algorithm.ref_model, "algorithm.ref_model", require_chat_template=required)


def _vocab_size(path: str, trust_remote_code: bool) -> int | None:
    """The logit width a model folder's config declares (its text model's, for a vision-language one)."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError):
        return None  # the model's loading says what is wrong with the folder
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return getattr(text, "vocab_size", None)


def _differences(ours: dict[str, int], theirs: dict[str, int], names: tuple[str, str], shown: int = 5) -> str:
    """A few tokens whose ids differ, or that only one of the vocabularies has."""
    out = []
    for token in sorted(ours.keys() | theirs.keys(), key=lambda t: (ours.get(t, -1), theirs.get(t, -1))):
        a, b = ours.get(token), theirs.get(token)
        if a != b:
            out.append(f"{token!r}: {names[0]} {_id(a)}, {names[1]} {_id(b)}")
        if len(out) == shown:
            break
    return "; ".join(out)


def _id(token_id: int | None) -> str:
    return "none" if token_id is None else str(token_id)
