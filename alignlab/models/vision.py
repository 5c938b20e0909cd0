"""Vision-language models: which part sees images, what their forward takes, and their image processor.

A vision-language checkpoint (its config has a `vision_config`, e.g. Qwen2-VL) loads through
`AutoModelForImageTextToText`. Its base model (`model.model`) takes token ids and pixels, writes the
image features into the image tokens' embeddings, and runs the language model with multimodal RoPE
positions; alignlab reads its last hidden states and applies the output layer to answer positions only,
as for text models (alignlab.models.logprobs).
"""

from __future__ import annotations

import functools
import inspect
import logging
import os

import torch

from alignlab.data.vision import ImageEncoder, vision_inputs

log = logging.getLogger(__name__)

# Attribute names under which transformers' vision-language models keep their vision tower
# (Qwen2-VL: model.visual, which holds its patch merger too; LLaVA-style: vision_tower + projector).
VISION_MODULES = ("visual", "vision_tower", "vision_model", "multi_modal_projector")


def _base(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def is_multimodal(model) -> bool:
    """Whether `model` (or the model under a PEFT wrapper or a reward model's backbone) takes images."""
    config = getattr(model, "config", None)
    return getattr(config, "vision_config", None) is not None


def trunk(model) -> torch.nn.Module:
    """The module that maps a batch's inputs to the last hidden states, before the output layer: a text
    model's decoder; a vision-language model's base model (vision tower, feature merge and language model)."""
    base = _base(model)
    return base.model if is_multimodal(base) else base.get_decoder()


def vision_modules(model) -> dict[str, torch.nn.Module]:
    """{qualified name: module} of the vision tower (and projector) of a vision-language model."""
    base = _base(model)
    found = {}
    for name, module in base.named_modules():
        if name.rsplit(".", 1)[-1] in VISION_MODULES and not any(name.startswith(f + ".") for f in found):
            found[name] = module
    return found


def freeze_vision(model) -> int:
    """Stop the vision tower (and projector) from training; returns how many parameters were frozen."""
    frozen = 0
    for module in vision_modules(model).values():
        for param in module.parameters():
            if param.requires_grad:
                param.requires_grad_(False)
                frozen += param.numel()
    return frozen


# Config attributes naming the tokens that stand for images and videos in a vision-language model's input.
VISION_TOKEN_KEYS = (
    "image_token_id",
    "video_token_id",
    "vision_start_token_id",
    "vision_end_token_id",
    "image_token_index",
)


def vision_token_ids(model) -> list[int]:
    """The ids of `model`'s image and video placeholder tokens ([] for a text model). Generation never
    samples them: an answer holding an image token would ask the forward for an image it does not have."""
    if not is_multimodal(model):
        return []
    config = _base(model).config
    return sorted({int(i) for k in VISION_TOKEN_KEYS if isinstance(i := getattr(config, k, None), int)})


@functools.cache
def _takes_modality(trunk_class: type) -> bool:
    """Whether a base model class's forward takes `mm_token_type_ids` (read once per class: every forward asks)."""
    return "mm_token_type_ids" in inspect.signature(trunk_class.forward).parameters


def forward_inputs(model, input_ids: torch.Tensor, batch: dict) -> dict:
    """The image inputs `model`'s forward takes for `input_ids` [N, T] and the batch's images: pixel_values
    and image_grid_thw (alignlab.data.vision), and the per-token modality `mm_token_type_ids` [N, T]
    (1 at image tokens) where the forward asks for it (Qwen2-VL's multimodal RoPE); {} without images.

    Raises:
        ValueError: `input_ids` hold image tokens but the batch has no images (the model would read the
            placeholders' own embeddings as if they were the image: a batch that lost its pixels).
    """
    inputs = vision_inputs(batch)
    base = _base(model)
    image_token = getattr(base.config, "image_token_id", None) if is_multimodal(base) else None
    if not inputs:
        if image_token is not None and bool((input_ids == image_token).any()):
            raise ValueError("image tokens in the batch but no images (pixel_values): images were lost on the way")
        return {}
    if image_token is not None and _takes_modality(type(trunk(base))):
        inputs["mm_token_type_ids"] = (input_ids == image_token).int()
    return inputs


def load_image_encoder(model, tokenizer, path: str | os.PathLike) -> ImageEncoder | None:
    """The image processor of the vision-language model at `path` (None for a text model): the
    processor's (`AutoProcessor`) where it loads, else the folder's image processor alone
    (`AutoImageProcessor`; e.g. where a processor also wants a video processor that needs torchvision).

    Raises:
        ConfigError: an image processor alignlab cannot lay images out for (see ImageEncoder).
    """
    if not is_multimodal(model):
        return None
    from transformers import AutoImageProcessor, AutoProcessor

    try:
        image_processor = AutoProcessor.from_pretrained(path).image_processor
    except Exception as e:  # noqa: BLE001 - any failure: the image processor alone does the job
        log.debug("AutoProcessor did not load from %s (%s); loading its image processor alone", path, e)
        image_processor = AutoImageProcessor.from_pretrained(path)
    image_token = tokenizer.convert_ids_to_tokens(_base(model).config.image_token_id)
    return ImageEncoder(image_processor, tokenizer, image_token)
