"""Batch collation shared by every DataModule.

Layout of an answer batch (the shape the log-prob code and later speed work rely on):
- input_ids, attention_mask: [N, T] right-padded per batch to the longest row
- loss_mask: [N, T], 1 on answer tokens (the positions whose log-prob counts), 0 on prompt and pad
- index: [rows] position of each row in its split; numeric columns such as `margin` and values computed
  once per row (AlignmentDataModule.add_row_values, e.g. reference log-probs) are stacked alongside.
Pairwise batches put the B chosen sequences first and the B rejected ones after, so one forward
pass serves both halves.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from alignlab.data.vision import select_vision


def pad(seqs: Sequence[Sequence[int]], pad_id: int, left: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad to the longest sequence; returns (ids, attention_mask)."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if not s:
            continue
        sl = slice(width - len(s), width) if left else slice(0, len(s))
        ids[i, sl] = torch.as_tensor(s, dtype=torch.long)
        mask[i, sl] = 1
    return ids, mask


def collate_answers(
    prompts: Sequence[list[int]],
    answers: Sequence[list[int]],
    pad_id: int,
    prompt_masks: Sequence[list[int] | None] | None = None,
) -> dict:
    """prompt + answer sequences with a loss mask over the answer tokens, and over the prompt tokens a
    row's `prompt_masks` entry marks (0/1 per prompt token: multi-turn SFT's earlier assistant turns;
    None: none)."""
    input_ids, attention_mask = pad([p + a for p, a in zip(prompts, answers)], pad_id)
    loss_mask = torch.zeros_like(attention_mask)
    for i, (p, a) in enumerate(zip(prompts, answers)):
        loss_mask[i, len(p) : len(p) + len(a)] = 1
        if prompt_masks is not None and prompt_masks[i] is not None:
            loss_mask[i, : len(p)] = torch.as_tensor(prompt_masks[i], dtype=loss_mask.dtype)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "loss_mask": loss_mask}


def scored_tokens(prompt_length: int, answer_length: int) -> int:
    """Answer tokens whose log-prob a loss counts in a `collate_answers` sequence: every answer token
    with a token before it (position 0 is predicted by nothing); the sum of the row's shifted
    loss_mask[:, 1:]."""
    return answer_length if prompt_length > 0 else max(answer_length - 1, 0)


def select_rows(batch: dict, rows: slice) -> dict:
    """Some sequences of an answer batch, cut to the longest of them (the padding is on the right), with
    their images (alignlab.data.vision) when they have any."""
    width = int(batch["attention_mask"][rows].sum(-1).max())
    picked = {k: batch[k][rows, :width] for k in ("input_ids", "attention_mask", "loss_mask")}
    return {**picked, **select_vision(batch, rows)}


def collate_prompts(prompts: Sequence[list[int]], pad_id: int) -> dict:
    """Left-padded prompts, ready for batched generation."""
    ids, mask = pad(prompts, pad_id, left=True)
    return {"prompt_input_ids": ids, "prompt_attention_mask": mask}


def collate_extras(examples: Sequence[dict], numeric: Sequence[str], text: Sequence[str]) -> dict:
    """Per-row values that travel with the batch: row index, numbers as float tensors (a row without
    the number, e.g. an optional `margin`, counts as 0), text as lists (None where a row has none)."""
    out = {"index": torch.tensor([e["index"] for e in examples], dtype=torch.long)}
    for key in numeric:
        values = [0.0 if e.get(key) is None else float(e[key]) for e in examples]
        out[key] = torch.tensor(values, dtype=torch.float32)
    for key in text:
        out[key] = [e.get(key) for e in examples]
    return out
