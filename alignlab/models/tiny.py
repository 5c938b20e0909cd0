"""The embedded tiny models: real Qwen2 and Qwen2-VL architectures and a byte-level ChatML tokenizer.

Built from a config (no download), written once with `save_pretrained`, then loaded like any
other model through `from_pretrained`. Every byte is one token, so any text round-trips and small
arithmetic answers are a few tokens long. The vision-language one (a spec with a `vision` entry)
adds Qwen2-VL's vision tokens to the tokenizer, a 1-layer vision tower and Qwen2-VL's image
processor (`preprocessor_config.json`), as a Qwen2-VL checkpoint on the Hub lays them out.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
PAD, EOS, BOT = "<|endoftext|>", "<|im_end|>", "<|im_start|>"
# Qwen2-VL's vision tokens, and its template's markup for an image content part.
VISION_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")
VL_CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters (byte-level BPE's alphabet)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def build_tokenizer(vision: bool = False):
    """Byte-level tokenizer: ids 0-255 are bytes, then <|endoftext|> (pad), <|im_end|> (eos), <|im_start|>;
    with `vision`, then VISION_TOKENS (ids 259-262) and a template that writes image content parts."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = _bytes_to_unicode()
    backend = Tokenizer(models.BPE(vocab={chars[b]: b for b in range(256)}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    extra = [BOT, *VISION_TOKENS] if vision else [BOT]
    backend.add_special_tokens([PAD, EOS, *extra])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD,
        eos_token=EOS,
        additional_special_tokens=extra,
        chat_template=VL_CHATML_TEMPLATE if vision else CHATML_TEMPLATE,
    )


def build_model(
    tokenizer,
    hidden_size: int,
    intermediate_size: int,
    num_hidden_layers: int,
    num_attention_heads: int,
    num_key_value_heads: int,
    max_position_embeddings: int,
    init_seed: int = 0,
):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
    )
    with torch.random.fork_rng(devices=[]):  # a fixed init without disturbing the caller's RNG
        torch.manual_seed(init_seed)
        model = Qwen2ForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def build_vl_model(tokenizer, vision: dict, init_seed: int = 0, **text):
    """A Qwen2-VL model: the text settings of `build_model` for its language model, `vision` for its
    vision tower (depth, embed_dim, num_heads, mlp_ratio, patch_size, spatial_merge_size, and the image
    processor's min_pixels/max_pixels, which are not the model's). Multimodal RoPE splits each head's
    rotary half-dimension over (time, height, width) as Qwen2-VL does: half, a quarter, a quarter."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    half = text["hidden_size"] // text["num_attention_heads"] // 2
    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [half // 2, half // 4, half // 4]}
    tower = {k: v for k, v in vision.items() if k not in ("min_pixels", "max_pixels")}
    start, end, image, video = tokenizer.convert_tokens_to_ids(list(VISION_TOKENS))
    config = Qwen2VLConfig(
        text_config={
            "vocab_size": len(tokenizer),
            **text,
            "rope_parameters": rope,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
            "bos_token_id": None,
        },
        vision_config={**tower, "hidden_size": text["hidden_size"], "temporal_patch_size": 2},
        vision_start_token_id=start,
        vision_end_token_id=end,
        image_token_id=image,
        video_token_id=video,
        tie_word_embeddings=True,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(init_seed)
        model = Qwen2VLForConditionalGeneration(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def build_image_processor(vision: dict):
    """Qwen2-VL's image processor for the tiny model: images resized to multiples of patch × merge
    pixels, between min_pixels and max_pixels in area."""
    from transformers import Qwen2VLImageProcessor

    return Qwen2VLImageProcessor(
        min_pixels=vision["min_pixels"],
        max_pixels=vision["max_pixels"],
        patch_size=vision["patch_size"],
        merge_size=vision["spatial_merge_size"],
        temporal_patch_size=2,
    )


def spec_hash(spec: dict) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:10]


def ensure_tiny_model(folder: str | os.PathLike, spec: dict) -> Path:
    """Write the tiny model to `<folder>-<hash of spec>` unless it is there; return that folder.

    Written to a temporary sibling and renamed, so concurrent runs (a sweep) never see half a model.
    """
    target = Path(f"{os.fspath(folder)}-{spec_hash(spec)}")
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        vision = spec.get("vision")
        tokenizer = build_tokenizer(vision=vision is not None)
        if vision is None:
            build_model(tokenizer, **spec).save_pretrained(tmp)
        else:
            build_vl_model(tokenizer, **spec).save_pretrained(tmp)
            build_image_processor(vision).save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "alignlab_tiny.json").write_text(json.dumps(spec, indent=2, sort_keys=True))
        try:
            tmp.rename(target)
        except OSError:  # another process finished first
            if not (target / "config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
