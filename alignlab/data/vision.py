"""Images of vision-language rows: the model's pixel inputs, the tokens that stand for each image, and
their place in batches.

A canonical row's prompt writes `<image>` (rows.IMAGE_PLACEHOLDER) where each of its `images` goes.
`ImageEncoder` turns the images into the model's inputs with the model's own image processor and
gives, per image, the text the chat template writes for an image content part with the image token
repeated once per token the image becomes (Qwen2-VL: `<|vision_start|>` + `<|image_pad|>` × n +
`<|vision_end|>`, n = grid t·h·w / merge²), which alignlab.data.tokenize puts in place of the
placeholder as special tokens.

In a batch the images of all rows are concatenated in row order:
- pixel_values [P, D]: P pixel rows (Qwen2-VL: one per 14×14×2 patch), image_grid_thw [I, 3]: (t, h, w)
  patches per image;
- images_per_row [N] and image_pixel_rows [I] say which image and pixel rows belong to which sequence,
  so rows can be selected (select_vision) without re-processing images.
A row without images contributes nothing; a batch with no image at all has none of these keys.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from alignlab.data.rows import IMAGE_COLUMNS, IMAGE_PLACEHOLDER
from alignlab.errors import ConfigError

__all__ = ["IMAGE_COLUMNS", "IMAGE_PLACEHOLDER", "ImageEncoder", "collate_vision", "select_vision", "vision_inputs"]
PIXEL_KEYS = ("pixel_values",)  # first dimension: pixel rows of all images
IMAGE_KEYS = ("image_grid_thw",)  # first dimension: images
VISION_KEYS = (*PIXEL_KEYS, *IMAGE_KEYS, "images_per_row", "image_pixel_rows")


def image_part_markup(tokenizer) -> str:
    """What the tokenizer's chat template writes for one image content part (`{"type": "image"}`) in a
    user message, e.g. Qwen2-VL's `<|vision_start|><|image_pad|><|vision_end|>`.

    Raises:
        ConfigError: the template does not write image parts.
    """
    before, after = "\ue010first\ue011", "\ue010second\ue011"
    parts = [{"type": "text", "text": before}, {"type": "image"}, {"type": "text", "text": after}]
    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": parts}], tokenize=False)
    except Exception as e:  # a template that only takes text contents
        raise ConfigError(f"the model's chat template cannot write an image content part ({e})") from None
    start, end = text.find(before), text.find(after)
    markup = text[start + len(before) : end] if 0 <= start < end else ""
    if not markup:
        raise ConfigError("the model's chat template writes nothing for an image content part ({'type': 'image'})")
    return markup


class ImageEncoder:
    """A vision-language model's image processor and image token, as the data modules use them.

    Args:
        image_processor: the model's (transformers) image processor; it must return `pixel_values` and
            `image_grid_thw` (the Qwen2-VL family) and have `merge_size`.
        tokenizer: the model's tokenizer, whose chat template writes image content parts.
        image_token: the token the model replaces by image features (config.image_token_id's token).
    Raises:
        ConfigError: an image processor or template alignlab cannot lay images out for.
    """

    def __init__(self, image_processor, tokenizer, image_token: str):
        if not hasattr(image_processor, "merge_size"):
            raise ConfigError(
                f"{type(image_processor).__name__}: alignlab lays out images for processors that return "
                "image_grid_thw and merge patches (the Qwen2-VL family); this one is not supported yet"
            )
        self.image_processor, self.image_token = image_processor, image_token
        markup = image_part_markup(tokenizer)
        if markup.count(image_token) != 1:
            raise ConfigError(
                f"the chat template's image markup {markup!r} must hold the image token {image_token!r} once"
            )
        self.before, self.after = markup.split(image_token)

    def tokens_per_image(self, image_grid_thw: torch.Tensor) -> list[int]:
        """[I] tokens each image becomes in the language model: its patches / merge_size²."""
        return (image_grid_thw.prod(-1) // self.image_processor.merge_size**2).tolist()

    def encode(self, images: Sequence) -> tuple[dict[str, torch.Tensor], list[str]]:
        """(model inputs of a row's images: pixel_values [P, D], image_grid_thw [I, 3]; per image the text
        that stands for it in the prompt, special tokens written out)."""
        out = self.image_processor(images=list(images), return_tensors="pt")
        grid = out["image_grid_thw"].long()
        inputs = {"pixel_values": out["pixel_values"], "image_grid_thw": grid}
        markups = [self.before + self.image_token * n + self.after for n in self.tokens_per_image(grid)]
        return inputs, markups


def collate_vision(rows: Sequence[dict | None]) -> dict:
    """The vision inputs of a batch's sequences, in order (`rows[i]`: sequence i's `ImageEncoder.encode`
    inputs, None without images); {} when no sequence has an image."""
    present = [r for r in rows if r is not None]
    if not present:
        return {}
    out = {k: torch.cat([r[k] for r in present]) for k in (*PIXEL_KEYS, *IMAGE_KEYS)}
    out["images_per_row"] = torch.tensor([0 if r is None else len(r["image_grid_thw"]) for r in rows])
    out["image_pixel_rows"] = torch.cat([r["image_grid_thw"].prod(-1) for r in present])
    return out


def select_vision(batch: dict, rows) -> dict:
    """The vision inputs of some sequences of a batch (`rows`: a slice, an index list or tensor), in
    that order; {} when they have no image (or the batch has none)."""
    if "images_per_row" not in batch:
        return {}
    per_row = batch["images_per_row"]
    picked = torch.arange(len(per_row))[rows] if isinstance(rows, slice) else torch.as_tensor(rows).flatten()
    picked = picked.to(per_row.device)
    image_start = torch.cumsum(per_row, 0) - per_row
    images = [i for r in picked.tolist() for i in range(int(image_start[r]), int(image_start[r] + per_row[r]))]
    if not images:
        return {}
    pixel_rows = batch["image_pixel_rows"]
    pixel_start = torch.cumsum(pixel_rows, 0) - pixel_rows
    pixels = [p for i in images for p in range(int(pixel_start[i]), int(pixel_start[i] + pixel_rows[i]))]
    device = batch["pixel_values"].device
    out = {k: batch[k][torch.tensor(pixels, device=device)] for k in PIXEL_KEYS}
    out.update({k: batch[k][torch.tensor(images, device=batch[k].device)] for k in IMAGE_KEYS})
    out["images_per_row"] = per_row[picked]
    out["image_pixel_rows"] = pixel_rows[torch.tensor(images, device=pixel_rows.device)]
    return out


def repeat_vision(batch: dict, times: int) -> dict:
    """The vision inputs of a batch whose every sequence is repeated `times` times in a row (a prompt's
    completions); {} without images."""
    if "images_per_row" not in batch:
        return {}
    rows = torch.arange(len(batch["images_per_row"])).repeat_interleave(times)
    return select_vision(batch, rows)


def vision_inputs(batch: dict) -> dict:
    """The keyword arguments a vision-language model's forward takes from a batch (none without images)."""
    return {k: batch[k] for k in (*PIXEL_KEYS, *IMAGE_KEYS) if k in batch}
