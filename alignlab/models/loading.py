"""Loading a policy and its tokenizer from a local folder or a Hub id, with optional LoRA."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from alignlab.errors import ConfigError, ModelLoadError
from alignlab.models.tiny import CHATML_TEMPLATE, ensure_tiny_model

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_model_path(model_cfg: DictConfig) -> str:
    """The folder or Hub id to load; the embedded tiny model is written first if needed."""
    if model_cfg.get("tiny"):
        return os.fspath(ensure_tiny_model(model_cfg.path, OmegaConf.to_container(model_cfg.tiny)))
    return os.fspath(model_cfg.path)


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hub's host answers at all; saves a minute of retries on a machine without network."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def check_hub_path(path: str) -> None:
    """For a Hub id: fine when cached locally or the Hub answers; else the offline hint at once."""
    if Path(path).expanduser().exists():
        return
    from huggingface_hub import try_to_load_from_cache

    if isinstance(try_to_load_from_cache(path, "config.json"), str) or hub_reachable():
        return
    raise _offline_hint(path, ConnectionError("no network"))


def _offline_hint(path: str, error: Exception) -> ModelLoadError:
    return ModelLoadError(
        f"Could not load model '{path}': it is not a local folder and the Hugging Face Hub could not be "
        f"reached, so download it where there is network access (e.g. `hf download {path} --local-dir "
        f"/path/to/copy`) and run with model.path=/path/to/copy. ({type(error).__name__})"
    )


def load_tokenizer(path: str, model_cfg: DictConfig, require_chat_template: bool):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=model_cfg.trust_remote_code)
    except (OSError, ValueError) as e:
        if Path(path).exists():
            raise ModelLoadError(f"Could not load a tokenizer from {path}: {e}") from None
        raise _offline_hint(path, e) from None
    if model_cfg.get("chat_template"):
        tokenizer.chat_template = model_cfg.chat_template
    if not tokenizer.chat_template:
        if require_chat_template:
            raise ConfigError(
                f"The model at {path} has no chat template. A preference stage needs a chat model: run "
                "algorithm=sft on it first (SFT installs a ChatML template), or set model.chat_template."
            )
        log.info("the tokenizer has no chat template; installing ChatML for SFT")
        tokenizer.chat_template = CHATML_TEMPLATE
    if tokenizer.pad_token is None:  # many base models ship without one
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


QUANTIZATIONS = (None, "4bit")


def is_hub_id(path: str) -> bool:
    """Whether `path` has the shape of a Hub model id ('name' or 'org/name'), rather than only a folder's."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if path.startswith((".", "~")) or os.path.isabs(path):
        return False
    try:
        validate_repo_id(path)
    except HFValidationError:
        return False
    return True


def check_model_path(model_cfg: DictConfig) -> None:
    """model.path that can only be a folder (not Hub-id-shaped) must exist; a Hub id must be cached
    or the Hub reachable (check_hub_path). The embedded tiny model is written on demand.

    Raises:
        ConfigError: no such folder. ModelLoadError: a Hub id offline and not cached.
    """
    if model_cfg.get("tiny"):
        return
    path = os.fspath(model_cfg.path)
    if Path(path).expanduser().exists():
        return
    if is_hub_id(path):
        check_hub_path(path)  # offline and not cached: the download hint, before anything is written
        return
    raise ConfigError(
        f"model.path={path}: no such folder (relative paths start from {Path.cwd()}); give a folder that "
        "holds a Hugging Face model (config.json, weights and tokenizer, e.g. a run's <run>/model) or "
        "a Hub id such as Qwen/Qwen2.5-0.5B-Instruct"
    )


def check_model_config(model_cfg: DictConfig) -> None:
    """Model settings that can be checked before anything loads."""
    check_model_path(model_cfg)
    if model_cfg.dtype not in _DTYPES:
        raise ConfigError(f"model.dtype must be one of {sorted(_DTYPES)}, got {model_cfg.dtype!r}")
    quantization = model_cfg.get("quantization")
    if quantization not in QUANTIZATIONS:
        raise ConfigError(f"model.quantization must be one of {QUANTIZATIONS}, got {quantization!r}")
    if quantization == "4bit":
        if not model_cfg.lora.enabled:
            raise ConfigError(
                "model.quantization=4bit (QLoRA) trains LoRA adapters on frozen 4-bit weights: "
                "set model.lora.enabled=true"
            )
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise ConfigError("model.quantization=4bit needs bitsandbytes: pip install bitsandbytes") from None


def quantization_config(model_cfg: DictConfig):
    """The transformers quantization config for model.quantization (None: full-precision weights)."""
    if model_cfg.get("quantization") != "4bit":
        return None
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(  # QLoRA (Dettmers et al., 2023): NF4 weights, double quantization
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=_DTYPES[model_cfg.dtype],
    )


def load_model(model_cfg: DictConfig, require_chat_template: bool = True):
    """(model, tokenizer, path) for `model_cfg`; LoRA-wrapped when model.lora.enabled, on 4-bit base
    weights with model.quantization=4bit; gradient checkpointing with model.gradient_checkpointing."""
    from transformers import AutoModelForCausalLM

    check_model_config(model_cfg)  # a missing folder, or a Hub id offline: said before anything loads
    path = resolve_model_path(model_cfg)
    tokenizer = load_tokenizer(path, model_cfg, require_chat_template)
    quantization = quantization_config(model_cfg)
    placement = {}
    if quantization is not None and torch.cuda.is_available():  # quantize straight onto this process's GPU
        placement["device_map"] = {"": int(os.environ.get("LOCAL_RANK", 0))}
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path,
            dtype=_DTYPES[model_cfg.dtype],
            trust_remote_code=model_cfg.trust_remote_code,
            use_safetensors=True,  # never unpickle weights
            quantization_config=quantization,
            **placement,
        )
    except (OSError, ValueError) as e:
        if Path(path).exists():
            raise ModelLoadError(f"Could not load model weights from {path}: {e}") from None
        raise _offline_hint(path, e) from None
    checkpointing = bool(model_cfg.get("gradient_checkpointing"))
    if quantization is not None:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=checkpointing)
        for module in model.modules():
            # On CPU, bitsandbytes repacks 4-bit weights for inference at the first eval forward and
            # cannot train on them afterwards; training interleaves evaluation, so keep one layout.
            if hasattr(module, "support_avx512bf16_for_cpu"):
                module.support_avx512bf16_for_cpu = False
    elif checkpointing:
        # Recompute each layer's activations in the backward pass: memory for compute.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if model_cfg.lora.enabled:
            model.enable_input_require_grads()  # frozen embeddings: checkpointed layers still need a grad path
    if model_cfg.lora.enabled:
        model = apply_lora(model, model_cfg.lora)
    return model, tokenizer, path


def apply_lora(model, lora_cfg: DictConfig):
    from peft import LoraConfig, get_peft_model

    target = lora_cfg.target_modules
    config = LoraConfig(
        r=lora_cfg.r,
        lora_alpha=lora_cfg.alpha,
        lora_dropout=lora_cfg.dropout,
        task_type="CAUSAL_LM",
        target_modules=target if isinstance(target, str) else list(target),
    )
    return get_peft_model(model, config)


def is_peft(model) -> bool:
    return hasattr(model, "disable_adapter") and hasattr(model, "peft_config")
