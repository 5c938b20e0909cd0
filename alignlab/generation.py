"""Batched, KV-cached generation from left-padded prompts, and exact-match scoring."""

from __future__ import annotations

import torch


def completions_until_eos(sequences: torch.Tensor, eos_id: int) -> list[list[int]]:
    """Token lists cut just before the first eos (the eos itself is not part of the text)."""
    out = []
    for row in sequences.tolist():
        out.append(row[: row.index(eos_id)] if eos_id in row else row)
    return out


@torch.no_grad()
def generate(
    model,
    tokenizer,
    prompt_input_ids: torch.Tensor,
    prompt_attention_mask: torch.Tensor,
    max_new_tokens: int,
    do_sample: bool = False,
    temperature: float = 1.0,
) -> torch.Tensor:
    """[B, max_new_tokens or fewer] completion tokens (prompt removed), padded after eos."""
    was_training = model.training
    model.eval()
    try:
        out = model.generate(
            input_ids=prompt_input_ids,
            attention_mask=prompt_attention_mask,
            max_new_tokens=max_new_tokens,
            do_sample=do_sample,
            temperature=temperature if do_sample else None,
            # Sampling draws from the whole tempered distribution (not the model's default top-k/top-p),
            # so that online algorithms' log-probs describe what was sampled.
            top_k=0 if do_sample else None,
            top_p=1.0 if do_sample else None,
            repetition_penalty=1.0 if do_sample else None,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    finally:
        model.train(was_training)
    return out[:, prompt_input_ids.shape[1] :]


def exact_match(texts: list[str], solutions: list[str]) -> torch.Tensor:
    """1.0 where the answer equals the solution after stripping surrounding white space."""
    return torch.tensor([float(t.strip() == str(s).strip()) for t, s in zip(texts, solutions)])
