"""Loading a policy and its tokenizer from a local folder or a Hub id, with optional LoRA."""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from tokenizers import AddedToken

from alignlab.data import files
from alignlab.errors import ConfigError, ModelLoadError
from alignlab.models.logprobs import enable_padding_free
from alignlab.models.tiny import CHATML_TEMPLATE, ensure_tiny_model
from alignlab.models.vision import freeze_vision, is_multimodal, vision_modules

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_model_path(model_cfg: DictConfig) -> str:
    """The folder or Hub id to load; the embedded tiny model is written first if needed."""
    if model_cfg.get("tiny"):
        return os.fspath(ensure_tiny_model(model_cfg.path, OmegaConf.to_container(model_cfg.tiny)))
    return os.fspath(model_cfg.path)


def check_hub_path(path: str) -> None:
    """For a Hub id: fine when cached locally or the Hub answers; else the offline hint at once."""
    if Path(path).expanduser().exists():
        return
    from huggingface_hub import try_to_load_from_cache

    if isinstance(try_to_load_from_cache(path, "config.json"), str) or files.hub_reachable():
        return
    raise _offline_hint(path, ConnectionError("no network"))


def _offline_hint(path: str, error: Exception) -> ModelLoadError:
    return ModelLoadError(
        f"Could not load model '{path}': it is not a local folder and the Hugging Face Hub could not be "
        f"reached, so download it where there is network access (e.g. `hf download {path} --local-dir "
        f"/path/to/copy`) and run with model.path=/path/to/copy. ({type(error).__name__})"
    )


# Classes that load a folder's tokenizer.json exactly as written. For some model types (qwen2, phi3, …)
# AutoTokenizer substitutes its own class whatever tokenizer_config.json declares, and that class
# rebuilds the pipeline: Qwen2Tokenizer adds Unicode NFC, so "e" + combining accent became "é".
GENERIC_TOKENIZER_CLASSES = ("TokenizersBackend", "PreTrainedTokenizerFast")


def tokenizer_from_pretrained(path: str | os.PathLike, trust_remote_code: bool = False):
    """The tokenizer of a folder or Hub id, as the folder declares it.

    A folder whose tokenizer_config.json names the generic class (alignlab's embedded model and the
    folders exported from it) loads its tokenizer.json unchanged, so any text encodes and decodes
    byte for byte; other folders load through AutoTokenizer. Raises what `from_pretrained` raises.
    """
    from transformers import AutoTokenizer, PreTrainedTokenizerFast
    from transformers.models.auto.tokenization_auto import get_tokenizer_config

    declared = get_tokenizer_config(os.fspath(path))
    if declared.get("tokenizer_class") in GENERIC_TOKENIZER_CLASSES and "auto_map" not in declared:
        return PreTrainedTokenizerFast.from_pretrained(path)
    return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)


def load_tokenizer(path: str, model_cfg: DictConfig, require_chat_template: bool):
    """The tokenizer a run uses for the model at `path` (see `prepare_tokenizer`)."""
    return prepare_tokenizer(path, model_cfg, require_chat_template)[0]


def prepare_tokenizer(path: str, model_cfg: DictConfig, require_chat_template: bool):
    """(tokenizer, ids of the tokens added to it) for the model at `path`.

    The chat template is `model.chat_template` when set, else the model's own; a model without one
    gets ChatML when the stage allows it (SFT). A template alignlab installs has its markers added as
    special tokens (see `install_chat_template`); pad falls back to eos.
    Raises ModelLoadError (unloadable folder, unreachable Hub) and ConfigError (no template where a
    preference stage needs one).
    """
    try:
        tokenizer = tokenizer_from_pretrained(path, trust_remote_code=model_cfg.trust_remote_code)
    except (OSError, ValueError) as e:
        if Path(path).exists():
            raise ModelLoadError(f"Could not load a tokenizer from {path}: {e}") from None
        raise _offline_hint(path, e) from None
    template = model_cfg.get("chat_template")
    if not template and not tokenizer.chat_template:
        if require_chat_template:
            raise ConfigError(
                f"The model at {path} has no chat template. A preference stage needs a chat model: run "
                "algorithm=sft on it first (SFT installs a ChatML template), or set model.chat_template."
            )
        log.info("the tokenizer has no chat template; installing ChatML for SFT")
        template = CHATML_TEMPLATE
    if tokenizer.pad_token is None:  # many base models ship without one
        tokenizer.pad_token = tokenizer.eos_token
    added = []
    if template:
        added = install_chat_template(tokenizer, template, model_cfg.get("new_special_tokens") or ())
    return tokenizer, added


# A template's control tokens by ChatML's convention: `<|im_start|>`, `<|im_end|>`, Phi-3's `<|end|>`, …
_MARKER = re.compile(r"<\|[^|\s<>{}'\"]+\|>")


def template_markers(template: str, new_special_tokens: Sequence[str] = ()) -> list[str]:
    """The control tokens a chat template writes: every `<|name|>` literal in it, then
    `new_special_tokens` (markers of other shapes, e.g. Gemma's `<start_of_turn>`), each once."""
    return list(dict.fromkeys([*_MARKER.findall(template), *new_special_tokens]))


def adds_bos(tokenizer) -> bool:
    """Whether the tokenizer puts its BOS before text it encodes (Llama: `<s>`; GPT-2: no)."""
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer("a")["input_ids"][:1] == [bos]


def install_chat_template(tokenizer, template: str, new_special_tokens: Sequence[str] = ()) -> list[int]:
    """Set `template` on the tokenizer so that it encodes what a chat model of that template reads.

    Its markers (`template_markers`) become single special tokens, added after the vocabulary where the
    tokenizer lacks them (the model's embeddings must then grow: `grow_embeddings`). A tokenizer that
    puts BOS before text (Llama) gets it at the start of each conversation, as templates of such
    models write it, since alignlab encodes rendered conversations without adding special tokens.
    Returns the ids of the tokens added, ascending ([] when the tokenizer had them all).
    """
    if adds_bos(tokenizer) and "bos_token" not in template and tokenizer.bos_token not in template:
        template = "{{ bos_token }}" + template
    tokenizer.chat_template = template
    before = len(tokenizer)
    markers = [AddedToken(m, special=True, normalized=False) for m in template_markers(template, new_special_tokens)]
    tokenizer.add_special_tokens({"extra_special_tokens": markers}, replace_extra_special_tokens=False)
    return list(range(before, len(tokenizer)))


def grow_embeddings(model, new_ids: Sequence[int]) -> None:
    """Give tokens just added to the tokenizer their embedding rows.

    The input and output embeddings grow to cover the largest new id (rows a padded vocabulary already
    has are reused), and every new row, input and output alike (tied or not), is the mean of the rows of
    the ids before the first new one (Hewitt, 2021, "Initializing new word embeddings"), so the new
    tokens start with the average token's meaning instead of noise. A bias of the output layer gets
    the mean bias.
    """
    if not new_ids:
        return
    if max(new_ids) >= model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(max(new_ids) + 1, mean_resizing=False)
    known, rows = min(new_ids), torch.as_tensor(list(new_ids))
    layers = [model.get_input_embeddings(), model.get_output_embeddings()]
    with torch.no_grad():
        seen = set()
        for layer in layers:
            for param in (getattr(layer, "weight", None), getattr(layer, "bias", None)):
                if param is None or param.data_ptr() in seen:  # a tied output layer shares the input's rows
                    continue
                seen.add(param.data_ptr())
                param[rows] = param[:known].double().mean(0).to(param.dtype)


def stop_at_end_of_turn(model, tokenizer) -> None:
    """Add the chat template's end of turn to `generation_config.eos_token_id` (kept as a list), so
    generation from the model, and from the folder it is exported to, stops where an answer ends."""
    from alignlab.data.tokenize import end_of_turn_ids

    config = model.generation_config
    listed = config.eos_token_id if isinstance(config.eos_token_id, list) else [config.eos_token_id]
    listed = [i for i in listed if i is not None]
    stop = end_of_turn_ids(tokenizer)[-1]
    if stop not in listed:
        config.eos_token_id = [*listed, stop]


QUANTIZATIONS = (None, "4bit")


def auto_model_class(path: str | os.PathLike, trust_remote_code: bool = False):
    """The Auto class a folder or Hub id loads with: AutoModelForImageTextToText for a vision-language
    model (its config has a `vision_config`), else AutoModelForCausalLM."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError):
        return AutoModelForCausalLM  # from_pretrained then says what is wrong with the folder
    return AutoModelForImageTextToText if getattr(config, "vision_config", None) is not None else AutoModelForCausalLM


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
    weights with model.quantization=4bit; gradient checkpointing with model.gradient_checkpointing; packed
    answer log-probs with model.padding_free (where the architecture allows, else one warning). A
    vision-language model's vision tower is frozen unless model.freeze_vision=false, and LoRA adapts only
    its language model then."""
    check_model_config(model_cfg)  # a missing folder, or a Hub id offline: said before anything loads
    path = resolve_model_path(model_cfg)
    tokenizer, added = prepare_tokenizer(path, model_cfg, require_chat_template)
    if added and model_cfg.lora.enabled and not model_cfg.lora.merge:
        raise ConfigError(
            f"The chat template's tokens {tokenizer.convert_ids_to_tokens(added)} are new to the tokenizer of "
            f"{path}, so the embeddings grow; model.lora.merge=false would save only an adapter, which does not "
            "load on the unchanged base model. Set model.lora.merge=true (the default), or start from a model "
            "whose tokenizer has these tokens."
        )
    quantization = quantization_config(model_cfg)
    model = load_weights(path, model_cfg, quantization)
    grow_embeddings(model, added)
    stop_at_end_of_turn(model, tokenizer)
    model = prepare_for_training(model, model_cfg, quantized=quantization is not None)
    if model_cfg.get("padding_free"):
        enable_padding_free(model)  # set on the base model: PEFT's wrapper and a deep copy read it through
    frozen_vision = is_multimodal(model) and model_cfg.get("freeze_vision", True)
    if frozen_vision:
        log.info("vision tower frozen (model.freeze_vision=true): %d parameters", freeze_vision(model))
    if model_cfg.lora.enabled:
        model = apply_lora(model, model_cfg.lora, added, exclude=list(vision_modules(model)) if frozen_vision else ())
    return model, tokenizer, path


def load_weights(path: str, model_cfg: DictConfig, quantization):
    """The model in `path` (safetensors only) in model.dtype, quantized by `quantization` (4-bit straight
    onto this process's GPU where there is one).

    Raises:
        ModelLoadError: weights that do not load, or a Hub id offline and not cached.
    """
    placement = {}
    if quantization is not None and torch.cuda.is_available():  # quantize straight onto this process's GPU
        placement["device_map"] = {"": int(os.environ.get("LOCAL_RANK", 0))}
    try:
        return auto_model_class(path, model_cfg.trust_remote_code).from_pretrained(
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


def prepare_for_training(model, model_cfg: DictConfig, quantized: bool):
    """The model ready to train on 4-bit weights (PEFT's prepare_model_for_kbit_training) when `quantized`,
    with gradient checkpointing when model.gradient_checkpointing."""
    checkpointing = bool(model_cfg.get("gradient_checkpointing"))
    if quantized:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=checkpointing)
        for module in model.modules():
            # On CPU, bitsandbytes repacks 4-bit weights for inference at the first eval forward and
            # cannot train on them afterwards; training interleaves evaluation, so keep one layout.
            if hasattr(module, "support_avx512bf16_for_cpu"):
                module.support_avx512bf16_for_cpu = False
    elif checkpointing:
        # Recompute each layer's activations in the backward pass: memory for compute.
        if hasattr(model, "activation_checkpointing_enable"):  # transformers ≥ 5.23; the old name warns
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if model_cfg.lora.enabled:
            model.enable_input_require_grads()  # frozen embeddings: checkpointed layers still need a grad path
    return model


def apply_lora(model, lora_cfg: DictConfig, new_token_ids: Sequence[int] = (), exclude: Sequence[str] = ()):
    """The model wrapped in LoRA adapters. Rows of tokens just added to the tokenizer train too (PEFT's
    `trainable_token_indices`, in the input and, when untied, the output embeddings), since their
    mean-initialised rows carry no meaning yet; merging writes them into the exported embeddings.
    `exclude`: qualified names of modules (e.g. a frozen vision tower) whose layers get no adapter."""
    from peft import LoraConfig, get_peft_model

    target = lora_cfg.target_modules
    tokens = None
    if new_token_ids:
        tokens = {_module_name(model, model.get_input_embeddings()): list(new_token_ids)}
        output = model.get_output_embeddings()
        if output is not None and output.weight is not model.get_input_embeddings().weight:
            tokens[_module_name(model, output)] = list(new_token_ids)
    config = LoraConfig(
        r=lora_cfg.r,
        lora_alpha=lora_cfg.alpha,
        lora_dropout=lora_cfg.dropout,
        task_type="CAUSAL_LM",
        target_modules=target if isinstance(target, str) else list(target),
        trainable_token_indices=tokens,
        exclude_modules=rf"({'|'.join(map(re.escape, exclude))})(\..*)?" if exclude else None,
    )
    return get_peft_model(model, config)


def _module_name(model, module) -> str:
    """The last part of `module`'s name in `model` (`embed_tokens`, `wte`, `lm_head`), as PEFT matches it."""
    return next(name for name, m in model.named_modules() if m is module).rsplit(".", 1)[-1]


def is_peft(model) -> bool:
    return hasattr(model, "disable_adapter") and hasattr(model, "peft_config")
