"""Turning canonical rows into token ids: prompts through the chat template, answers + eos."""

from __future__ import annotations

from collections.abc import Sequence


def encode_prompts(tokenizer, prompts: Sequence[list[dict]]) -> list[list[int]]:
    """Render each prompt with the model's chat template (ending in the assistant header)."""
    texts = [tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=False) for p in prompts]
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def encode_answers(tokenizer, answers: Sequence[str]) -> list[list[int]]:
    """Answer tokens followed by eos, which ends the assistant turn and teaches the model to stop."""
    ids = tokenizer(list(answers), add_special_tokens=False)["input_ids"]
    return [a + [tokenizer.eos_token_id] for a in ids]


def fit_answer(prompt_len: int, answer: list[int], max_length: int) -> list[int] | None:
    """Truncate the answer from its end so prompt + answer fits; None when no answer token fits."""
    room = max_length - prompt_len
    if room < 1:
        return None
    return answer[:room]
