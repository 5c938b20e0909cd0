"""Batched, KV-cached generation from left-padded prompts, and exact-match scoring.

Sampling can be keyed: each row's draws then depend only on its key (seed, step, data row, sample
number) and the model, never on which batch or process the row is in, so a run on N processes
samples exactly what one process with the same global batch samples, and a resumed run what the
uninterrupted run would have. Each step inverts the row's own CDF of softmax(logits/T) at a uniform
number taken from a counter-based hash of (key, position).
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from decimal import Decimal, InvalidOperation

import torch

from alignlab.data.tokenize import end_of_turn_ids
from alignlab.models.vision import forward_inputs, vision_token_ids

_MASK32 = 0xFFFFFFFF


def stop_token_ids(model, tokenizer) -> list[int]:
    """Every token id that ends an answer: the chat template's end of turn, each id of the model's
    generation_config.eos_token_id (an int or a list), and the tokenizer's eos, in that order, without
    repeats. Generation stops at the first of any of them, and answers are cut there.

    Gemma-style models end a turn with `<end_of_turn>`, not eos `<eos>`; Llama-3-Instruct lists
    `<|eot_id|>` and `<|end_of_text|>`: stopping at the tokenizer's eos alone would run past the answer.
    """
    generation_config = getattr(model, "generation_config", None)
    listed = getattr(generation_config, "eos_token_id", None)
    if generation_config is None:
        listed = getattr(getattr(model, "config", None), "eos_token_id", None)
    listed = [] if listed is None else [listed] if isinstance(listed, int) else list(listed)
    ids = [*end_of_turn_ids(tokenizer)[-1:], *listed, tokenizer.eos_token_id]  # [-1]: the one it stops at
    return list(dict.fromkeys(int(i) for i in ids if i is not None))


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x·c) mod 2³² for int64 tensors holding 32-bit values, without int64 overflow."""
    low = (x & 0xFFFF) * c
    high = (((x >> 16) * c) & 0xFFFF) << 16
    return (low + high) & _MASK32


def hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer mix (lowbias32, C. Wellons) of int64 tensors holding 32-bit values."""
    x = x & _MASK32
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def sample_keys(seed: int, step: int, rows: torch.Tensor, num_per_prompt: int = 1) -> torch.Tensor:
    """[len(rows)·num_per_prompt] keys: sample j of data row r at `step` (consecutive per row)."""
    seed = (seed ^ (seed >> 32)) & _MASK32
    base = hash32(hash32(torch.tensor(seed, dtype=torch.long)) ^ (step & _MASK32))
    per_row = hash32(base ^ rows.long().cpu().repeat_interleave(num_per_prompt))
    j = torch.arange(num_per_prompt).repeat(len(rows))
    return hash32(per_row ^ hash32(j + 0x9E3779B9))


def keyed_uniform(keys: torch.Tensor, position: int) -> torch.Tensor:
    """[B] float64 uniform numbers in (0, 1) with 53 random bits, a function of (key, position) alone."""
    at = hash32(keys ^ hash32(torch.tensor(position + 0x632BE5AB, device=keys.device)))
    high, low = hash32(at ^ 0x85EBCA6B) >> 6, hash32(at ^ 0xC2B2AE35) >> 5  # 26 + 27 bits
    return ((high * 2**27 + low).double() + 0.5) / 2**53


class KeyedSampling:
    """A logits processor that turns greedy decoding into keyed sampling at `temperature`: it leaves
    only the token the row's uniform number picks from softmax(scores / temperature)."""

    def __init__(self, keys: torch.Tensor, temperature: float, prompt_length: int):
        self.keys, self.temperature, self.prompt_length = keys, temperature, prompt_length

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        choice = keyed_choice(scores, self.keys, input_ids.shape[1] - self.prompt_length, self.temperature)
        return torch.full_like(scores, float("-inf")).scatter_(1, choice.unsqueeze(1), 0.0)


def keyed_choice(scores: torch.Tensor, keys: torch.Tensor, position: int, temperature: float) -> torch.Tensor:
    """[B] token ids: each row's inverse CDF of softmax(scores / temperature) at its keyed uniform."""
    u = keyed_uniform(keys.to(scores.device), position)
    cdf = torch.softmax(scores.double() / temperature, -1).cumsum(-1)
    return torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(1)).squeeze(1).clamp(max=scores.shape[-1] - 1)


def _cache_kwarg(model) -> str:
    """The name `model`'s forward takes its KV cache by: `cache` from transformers 5.24 on (where
    `past_key_values` is deprecated, to be removed in 5.40), `past_key_values` before."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # a PEFT wrapper passes kwargs on
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def _cache_of(out):
    """The KV cache a forward returned, read under its current name where the output has it."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


@torch.no_grad()
def sample_shared_prefix(
    model,
    prompt_input_ids: torch.Tensor,
    prompt_attention_mask: torch.Tensor,
    num_per_prompt: int,
    max_new_tokens: int,
    temperature: float,
    keys: torch.Tensor,
    stop_ids: Sequence[int],
    pad_id: int,
) -> torch.Tensor:
    """[B·num_per_prompt, ≤ max_new_tokens] keyed samples (consecutive rows per prompt), each row
    padded with pad_id after its first token in `stop_ids` (see stop_token_ids). Each prompt is run
    through the model once and its KV cache copied to its completions, where generate() would run it
    once per completion; then a plain KV-cached decoding loop."""
    was_training = model.training
    model.eval()
    try:
        mask = prompt_attention_mask
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # left padding: positions count real tokens only
        out = model(
            input_ids=prompt_input_ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1
        )
        cache_kwarg, cache = _cache_kwarg(model), _cache_of(out)
        cache.batch_repeat_interleave(num_per_prompt)
        logits = out.logits[:, -1].repeat_interleave(num_per_prompt, 0)
        mask = mask.repeat_interleave(num_per_prompt, 0)
        position = positions[:, -1:].repeat_interleave(num_per_prompt, 0)
        done = torch.zeros(mask.shape[0], dtype=torch.bool, device=mask.device)
        stops = torch.tensor(list(stop_ids), dtype=torch.long, device=mask.device)
        tokens = []
        for step in range(max_new_tokens):
            choice = keyed_choice(logits, keys, step, temperature).masked_fill(done, pad_id)
            tokens.append(choice)
            done |= torch.isin(choice, stops)
            if done.all() or step == max_new_tokens - 1:
                break
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], 1)
            position = position + 1
            out = model(
                input_ids=choice.unsqueeze(1),
                attention_mask=mask,
                position_ids=position,
                use_cache=True,
                **{cache_kwarg: cache},
            )
            cache, logits = _cache_of(out), out.logits[:, -1]
    finally:
        model.train(was_training)
    return torch.stack(tokens, 1)


def cut_at_stop(tokens: torch.Tensor, stop_ids: Sequence[int]) -> tuple[list[list[int]], torch.Tensor]:
    """The one end-of-answer cutter: each row of generated `tokens` [N, R] up to and including its
    first token in `stop_ids` (the end of turn and every eos id, see stop_token_ids); a row without
    one keeps all R tokens. Whatever follows the first stop token (padding, or tokens sampled past
    it) is dropped.

    Returns (answers: N token lists, through the stop token; has_eos [N] bool: the answer has one,
    i.e. it was not cut at the length limit)."""
    is_stop = torch.isin(tokens, torch.tensor(list(stop_ids), dtype=tokens.dtype, device=tokens.device))
    has_eos = is_stop.any(-1)
    ends = torch.where(has_eos, is_stop.long().argmax(-1) + 1, tokens.shape[-1])  # argmax: the first stop
    return [row[:end] for row, end in zip(tokens.tolist(), ends.tolist())], has_eos


def answer_texts(tokenizer, answers: list[list[int]], has_eos: torch.Tensor) -> list[str]:
    """The text of answers cut by cut_at_stop: the stop token itself is not part of the text."""
    return tokenizer.batch_decode(
        [answer[:-1] if ended else answer for answer, ended in zip(answers, has_eos.tolist())],
        skip_special_tokens=True,
    )


@torch.no_grad()
def generate(
    model,
    tokenizer,
    prompt_input_ids: torch.Tensor,
    prompt_attention_mask: torch.Tensor,
    max_new_tokens: int,
    do_sample: bool = False,
    temperature: float = 1.0,
    keys: torch.Tensor | None = None,
    stop_ids: Sequence[int] | None = None,
    images: dict | None = None,
) -> torch.Tensor:
    """[B, max_new_tokens or fewer] completion tokens (prompt removed), each row padded after its
    first stop token: any of `stop_ids` (default stop_token_ids(model, tokenizer)).

    With do_sample and `keys` ([B] ints, see sample_keys), each row's sample depends on its key alone.
    `images`: the prompts' vision inputs for a vision-language model (alignlab.data.vision; a batch
    holding them will do), which transformers' generate takes with the prompts.
    """
    from transformers import LogitsProcessorList

    keyed = do_sample and keys is not None
    processors = LogitsProcessorList([KeyedSampling(keys, temperature, prompt_input_ids.shape[1])] if keyed else [])
    sampling = do_sample and not keyed  # keyed sampling is greedy decoding of noised logits
    was_training = model.training
    model.eval()
    try:
        out = model.generate(
            input_ids=prompt_input_ids,
            attention_mask=prompt_attention_mask,
            max_new_tokens=max_new_tokens,
            do_sample=sampling,
            temperature=temperature if sampling else None,
            # Sampling draws from the whole tempered distribution (not the model's default top-k/top-p),
            # so that online algorithms' log-probs describe what was sampled.
            top_k=0 if sampling else None,
            top_p=1.0 if sampling else None,
            repetition_penalty=1.0 if do_sample else None,
            logits_processor=processors,
            # Every end token, not the tokenizer's eos alone (which would override the model's list).
            eos_token_id=list(stop_ids) if stop_ids is not None else stop_token_ids(model, tokenizer),
            pad_token_id=tokenizer.pad_token_id,
            suppress_tokens=vision_token_ids(model) or None,  # answers are text: no image placeholders
            **forward_inputs(model, prompt_input_ids, images or {}),
        )
    finally:
        model.train(was_training)
    return out[:, prompt_input_ids.shape[1] :]


def _number(text: str) -> Decimal | None:
    try:
        value = Decimal(text)
    except (InvalidOperation, ValueError):
        return None
    return value if value.is_finite() else None


def matches_solution(answer: str, solution) -> bool:
    """Whether an answer is the row's solution: the same text once surrounding white space is
    stripped, or the same finite number when both read as numbers (exactly, as decimals: "5" matches
    5, 5.0 and "5.00"; "0.5" matches ".5"), as math-verify counts numeric answers equal. The solution
    may be any value (a Parquet float column gives 5.0 for a written 5); a missing one (None) never
    matches."""
    if solution is None:
        return False
    answer, expected = answer.strip(), str(solution).strip()
    if answer == expected:
        return True
    a, b = _number(answer), _number(expected)
    return a is not None and b is not None and a == b


def exact_match(texts: list[str], solutions: list) -> torch.Tensor:
    """[B] 1.0 where the answer matches the row's solution (see `matches_solution`), else 0.0."""
    return torch.tensor([float(matches_solution(t, s)) for t, s in zip(texts, solutions)])
