"""Answer prompts with a trained model, from Python or the command line.

    python -m alignlab.generate --model outputs/sft/<run>/model --input prompts.jsonl --output answers.jsonl

Input rows give `prompt` (text or a list of messages) or `messages` (an assistant answer at its end is
left out) in JSONL, JSON, CSV or Parquet; each output row is its input row plus `"completion"`. Prompts
go through the model's chat template exactly as in training (alignlab.data.tokenize), answers are
greedy (the default) or sampled at `--temperature`, and each ends where the template's end of turn or
any eos id of the model's generation config stands (alignlab.online.generation.stop_token_ids).
Rows with images (an `images` column and `<image>` placeholders, or image content parts, as in training
data: docs/data.md) are answered by a vision-language model with its image processor; relative image
paths start from the input file's folder.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from alignlab.algorithms.base import MAX_NEW_TOKENS

if TYPE_CHECKING:
    from omegaconf import DictConfig

__all__ = ["answer_batch", "build_parser", "complete", "load_policy", "main"]


def load_policy(folder: str | os.PathLike, device: str | torch.device = "cpu", model_cfg: DictConfig | None = None):
    """(model, tokenizer) of a trained policy, in eval mode on `device`, prepared as a training run
    prepares them (alignlab.models.loading.load_model): the chat template it was trained with (ChatML
    for a model without one, as SFT installs it), pad falling back to eos, generation stopping at the
    template's end of turn.

    Args:
        folder: an exported <run>/model, a LoRA adapter folder (<run>/adapter: transformers loads it on
            its base model through PEFT) or a Hub id.
        model_cfg: the `model` config group to load with (dtype, trust_remote_code, ...); None: the
            defaults of conf/ (float32). Its `path` is replaced by `folder`.

    Raises:
        ConfigError: no such folder. ModelLoadError: it holds no loadable model or tokenizer.
    """
    from omegaconf import OmegaConf

    from alignlab.models.loading import load_model
    from alignlab.runner.config import compose

    settings = OmegaConf.to_container(compose().model if model_cfg is None else model_cfg)  # not resolved: path goes
    settings.update(path=os.fspath(folder), tiny=None, gradient_checkpointing=False)
    settings["lora"]["enabled"] = False  # a saved adapter is loaded as saved, not wrapped in a new one
    model, tokenizer, _ = load_model(OmegaConf.create(settings), require_chat_template=False)
    return model.to(device).eval(), tokenizer


def answer_batch(
    model,
    tokenizer,
    prompt_input_ids: torch.Tensor,
    prompt_attention_mask: torch.Tensor,
    max_new_tokens: int = MAX_NEW_TOKENS,
    temperature: float = 0.0,
    keys: torch.Tensor | None = None,
    images: dict | None = None,
) -> list[str]:
    """The answers to a batch of left-padded prompts ([B, T] ids and mask, on the model's device):
    greedy at temperature 0, else sampled from softmax(logits / temperature) over the whole vocabulary
    (each row by its key, see alignlab.online.generation.sample_keys). Each answer is its text before
    the first stop token (stop_token_ids), at most `max_new_tokens` tokens. `images`: the prompts'
    vision inputs for a vision-language model (alignlab.data.vision)."""
    from alignlab.online.generation import answer_texts, cut_at_stop, generate, stop_token_ids

    stops = stop_token_ids(model, tokenizer)
    sampled = temperature > 0
    tokens = generate(
        model,
        tokenizer,
        prompt_input_ids,
        prompt_attention_mask,
        max_new_tokens=max_new_tokens,
        do_sample=sampled,
        temperature=temperature if sampled else 1.0,
        keys=keys if sampled else None,
        stop_ids=stops,
        images=images,
    )
    return answer_texts(tokenizer, *cut_at_stop(tokens, stops))


@torch.no_grad()
def complete(
    model,
    tokenizer,
    prompts: Sequence[list[dict]],
    max_new_tokens: int = MAX_NEW_TOKENS,
    batch_size: int = 16,
    temperature: float = 0.0,
    seed: int = 0,
    system_prompt: str = "keep",
    images: Sequence[list | None] | None = None,
    image_encoder=None,
) -> list[str]:
    """One answer per prompt (a list of messages), in order (see `answer_batch`).

    Prompts are encoded as training encodes them (alignlab.data.tokenize.encode_prompts) and answered
    `batch_size` at a time, shortest first so that batches pad little. A sampled answer depends on the
    seed and the prompt's position in `prompts` alone, not on the batch it lands in. `images[i]`: the
    PIL images of prompt i's `<image>` placeholders (None: a text prompt), processed by `image_encoder`
    (alignlab.data.vision.ImageEncoder, the vision-language model's; alignlab.models.vision.load_image_encoder).

    Raises:
        TemplateRefusal: the chat template refuses prompt `index` (e.g. a system role it lacks).
        ConfigError: prompts with images for a model without an image processor (a text model).
    """
    from alignlab.data.collate import collate_prompts
    from alignlab.data.tokenize import encode_prompts
    from alignlab.data.vision import collate_vision
    from alignlab.online.generation import sample_keys

    vision = encode_images(images, image_encoder, len(prompts))
    encoded = encode_prompts(tokenizer, prompts, system_prompt, [v[1] if v else None for v in vision])
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    device = next(model.parameters()).device
    texts: list[str] = [""] * len(encoded)
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        batch = collate_prompts([encoded[i] for i in rows], tokenizer.pad_token_id)
        keys = sample_keys(seed, 0, torch.tensor(rows)) if temperature > 0 else None
        ids, mask = batch["prompt_input_ids"].to(device), batch["prompt_attention_mask"].to(device)
        pixels = {
            k: v.to(device) for k, v in collate_vision([vision[i][0] if vision[i] else None for i in rows]).items()
        }
        answers = answer_batch(model, tokenizer, ids, mask, max_new_tokens, temperature, keys, pixels)
        for i, text in zip(rows, answers):
            texts[i] = text
    return texts


def encode_images(images: Sequence[list | None] | None, image_encoder, count: int) -> list:
    """Each of `count` prompts' vision inputs from its images (`image_encoder.encode`), None for a text
    prompt (all None when `images` is).

    Raises:
        ConfigError: images for a model without an image processor (a text model).
    """
    from alignlab.errors import ConfigError

    if images is None or not any(images):
        return [None] * count
    if image_encoder is None:
        raise ConfigError("the prompts have images, but the model has no image processor (a text model)")
    return [image_encoder.encode(i) if i else None for i in images]


def build_parser() -> argparse.ArgumentParser:
    """The command line of `python -m alignlab.generate`."""
    parser = argparse.ArgumentParser(
        prog="python -m alignlab.generate", description="Answer prompts with a trained model."
    )
    parser.add_argument("--model", required=True, help="a model folder (<run>/model, <run>/adapter) or a Hub id")
    parser.add_argument("--input", required=True, help="rows with `prompt` (text or messages) or `messages`")
    parser.add_argument("--output", required=True, help="JSONL file to write: each input row plus `completion`")
    parser.add_argument("--batch-size", type=int, default=16, help="prompts per generate call (16)")
    parser.add_argument(
        "--max-new-tokens",
        type=int,
        default=MAX_NEW_TOKENS,
        help=f"longest answer in tokens (conf/train.yaml's evaluation.max_new_tokens, {MAX_NEW_TOKENS})",
    )
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default); > 0: sample")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed: the same seed gives the same answers")
    parser.add_argument("--system-prompt", choices=("keep", "merge"), default="keep", help="as data.system_prompt")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None, help="as model.dtype")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from alignlab.data.files import write_jsonl
    from alignlab.errors import AlignlabError

    parser = build_parser()
    args = parser.parse_args(argv)
    if args.batch_size < 1 or args.max_new_tokens < 1 or args.temperature < 0:
        parser.error("--batch-size and --max-new-tokens must be >= 1 and --temperature >= 0")
    if not Path(args.output).resolve().parent.is_dir():  # found out now, not after the work
        parser.error(f"--output {args.output}: no such folder to write it in")
    try:
        raw, canonical = read_prompts(args.input)
        texts = answer_rows(args, raw, canonical)
    except (AlignlabError, OSError) as e:
        print(f"alignlab.generate: error: {e}", file=sys.stderr)
        return 1
    kept = [{k: v for k, v in row.items() if v is not None} for row in raw]  # CSV/Parquet fill absent cells
    write_jsonl(args.output, [{**row, "completion": text} for row, text in zip(kept, texts)])
    print(f"alignlab.generate: wrote {len(texts)} completions to {args.output}")
    return 0


def read_prompts(path: str) -> tuple[list[dict], list[dict]]:
    """(the file's rows as read, the same rows as canonical prompt rows: `prompt` messages, `images`).

    Raises:
        DataError: no rows, or a row without a prompt (naming the row and field). OSError: unreadable.
    """
    from alignlab.data.files import read_rows
    from alignlab.data.rows import to_canonical
    from alignlab.errors import DataError

    raw = read_rows(path)
    if not raw:
        raise DataError(path, "has no rows")
    folder = Path(path).parent  # relative image paths start there
    return raw, [to_canonical(r, "prompt", path, i + 1, base_dir=folder) for i, r in enumerate(raw)]


def answer_rows(args: argparse.Namespace, raw: list[dict], canonical: list[dict]) -> list[str]:
    """The answers of --model to the rows' prompts, as the command line asks (see `complete`).

    Raises:
        DataError: the chat template refuses a row (naming its row and field). ModelLoadError, ConfigError:
            as load_policy and complete raise them.
    """
    from alignlab.data.tokenize import TemplateRefusal
    from alignlab.errors import DataError
    from alignlab.models.vision import load_image_encoder

    model_cfg = None
    if args.dtype:
        from alignlab.runner.config import compose

        model_cfg = compose([f"model.dtype={args.dtype}"]).model
    model, tokenizer = load_policy(args.model, args.device, model_cfg)
    try:
        return complete(
            model,
            tokenizer,
            [row["prompt"] for row in canonical],
            args.max_new_tokens,
            args.batch_size,
            args.temperature,
            args.seed,
            args.system_prompt,
            images=[row.get("images") for row in canonical],
            image_encoder=load_image_encoder(model, tokenizer, args.model),
        )
    except TemplateRefusal as e:
        field = "messages" if raw[e.index].get("messages") is not None else "prompt"
        hint = " (--system-prompt merge folds system messages into the next user message)"
        raise DataError(args.input, f'the chat template refuses it: "{e.reason}"{hint}', e.index + 1, field) from None


if __name__ == "__main__":
    sys.exit(main())
