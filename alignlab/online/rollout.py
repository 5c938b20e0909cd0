"""Sampling answers for online algorithms (PPO, GRPO) and packing them for scoring.

One place turns a batch of left-padded prompts into sampled answers laid out as right-padded
prompt + answer rows (the layout `answer_logprobs` and the reward model read), plus response-aligned
masks, and reads the answers' per-token log-probs under the policy or the reference
(`token_logprobs`), so every online algorithm shares it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from alignlab.data.collate import collate_answers
from alignlab.data.vision import repeat_vision, select_vision
from alignlab.models.logprobs import answer_logprobs
from alignlab.models.reference import ReferenceModel
from alignlab.online.backends import GenerationBackend, Sampled, TransformersBackend
from alignlab.online.generation import cut_at_stop, generate, sample_keys, stop_token_ids


@dataclass
class Samples:
    seqs: dict  # input_ids, attention_mask, loss_mask [N, T]: prompt + answer, right-padded
    starts: torch.Tensor  # [N] where each answer starts (= its prompt's length)
    mask: torch.Tensor  # [N, R] 1 on each answer's real tokens (through its first stop token)
    has_eos: torch.Tensor  # [N] the answer ended with a stop token, eos or end of turn (not cut at the length limit)
    prompts: list[list[int]]  # [N] prompt token ids
    responses: list[list[int]]  # [N] answer token ids (through the stop token)
    # [N, R] the engine's log-prob of each answer token at sampling time, 0 past its end; None when the
    # policy sampled in this process (alignlab.online.backends.Sampled)
    sampling_logprobs: torch.Tensor | None = None
    # what sampling measured, logged with the rollout's metrics (multi-turn: alignlab.online.multiturn.episode_metrics)
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)


def prompt_ids(batch: dict) -> list[list[int]]:
    """The unpadded prompt token ids of a left-padded batch."""
    return [ids[m.bool()].tolist() for ids, m in zip(batch["prompt_input_ids"], batch["prompt_attention_mask"])]


def response_positions(per_position: torch.Tensor, starts: torch.Tensor, length: int) -> torch.Tensor:
    """[N, length] values at positions starts−1+j: for a right-padded prompt+answer row whose answer
    starts at `starts`, position starts−1+j is where answer token j is predicted."""
    index = (starts.unsqueeze(1) - 1 + torch.arange(length, device=starts.device)).clamp(max=per_position.shape[1] - 1)
    return per_position.gather(1, index)


def token_logprobs(
    scorer: torch.nn.Module | ReferenceModel,
    seqs: dict,
    starts: torch.Tensor,
    length: int,
    temperature: float = 1.0,
    entropy: bool = False,
    entropy_grad: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """log π(answer token j | prompt, answer tokens < j) at `temperature`, aligned with the answers:
    [N, length], from answer_logprobs on right-padded prompt + answer rows `seqs` whose answers start
    at `starts` [N] (response_positions). `scorer`: the policy (gradients flow), or a ReferenceModel
    (without gradients). With `entropy` (the policy only): (log-probs, each position's entropy [N,
    length], detached unless `entropy_grad`, for an entropy bonus). Values past an answer's end are not
    zeroed: multiply by its mask."""
    if isinstance(scorer, ReferenceModel):
        if entropy:
            raise ValueError("token_logprobs: entropy is computed for the policy only, not a ReferenceModel")
        out = scorer.answer_logprobs(seqs, temperature)
    else:
        out = answer_logprobs(scorer, seqs, temperature, entropy=entropy, entropy_grad=entropy_grad)
    logps = response_positions(out.token_logps, starts, length)
    return (logps, response_positions(out.token_entropy, starts, length)) if entropy else logps


def pack(
    prompts: list[list[int]],
    responses: list[list[int]],
    has_eos: torch.Tensor,
    pad_id: int,
    device: torch.device,
    images: dict | None = None,
    sampling_logprobs: list[torch.Tensor] | None = None,
    masks: list[torch.Tensor] | None = None,
) -> Samples:
    """Samples of prompt + answer rows; `images`: each row's prompt's vision inputs (alignlab.data.vision);
    `sampling_logprobs`: each answer's engine log-probs ([len(answer)] per row), padded with 0 into
    Samples.sampling_logprobs; `masks`: each answer's trained tokens ([len(answer)] per row, e.g. a
    multi-turn episode's policy tokens, 0 on tool results), else every answer token."""
    seqs = {k: v.to(device) for k, v in {**collate_answers(prompts, responses, pad_id), **(images or {})}.items()}
    lengths = torch.tensor([len(r) for r in responses], device=device)
    mask = (torch.arange(int(lengths.max()), device=device) < lengths.unsqueeze(1)).float()
    if masks is not None:
        for row, values in enumerate(masks):
            mask[row, : len(values)] = values.to(device=device, dtype=mask.dtype)
    starts = torch.tensor([len(p) for p in prompts], device=device)
    logps = None
    if sampling_logprobs is not None:
        logps = torch.zeros(mask.shape, dtype=torch.float32, device=device)
        for row, values in enumerate(sampling_logprobs):
            logps[row, : len(values)] = values.to(device=device, dtype=torch.float32)
    return Samples(seqs, starts, mask, has_eos.to(device), prompts, responses, logps)


def row_sampling_logprobs(samples: Samples, row: int) -> torch.Tensor:
    """[len(answer)] the engine's log-probs of one row's answer (Samples.sampling_logprobs without padding)."""
    return samples.sampling_logprobs[row, : len(samples.responses[row])]


@torch.no_grad()
def sample(
    model,
    tokenizer,
    batch: dict,
    max_new_tokens: int,
    temperature: float,
    chunk: int,
    num_per_prompt: int = 1,
    do_sample: bool = True,
    step: int | None = None,
    backend: GenerationBackend | None = None,
) -> Samples:
    """`num_per_prompt` answers to each prompt (consecutive rows), KV-cached, at most `chunk` answers
    at a time. With `step` (a count of rollouts so far) sampling is keyed on (seed, step, the batch's
    data rows): the same answers whatever the batch split or process count; each prompt is then
    encoded once for all its answers (sample_shared_prefix), by `backend` (alignlab.online.backends; default: this
    process's model). Without, `generate` samples plainly. Answers end at the first of any stop token
    (the template's end of turn, every eos id: stop_token_ids)."""
    stops, pad = stop_token_ids(model, tokenizer), tokenizer.pad_token_id
    ids, attn = batch["prompt_input_ids"], batch["prompt_attention_mask"]
    keys = sample_keys(torch.initial_seed(), step, batch["index"], num_per_prompt) if step is not None else None
    images = repeat_vision(batch, num_per_prompt)  # each answer's prompt's images (none for text prompts)
    if step is not None and not images:  # keyed: each prompt's KV cache is computed once and shared by its completions
        settings = (num_per_prompt, max_new_tokens, temperature)
        pieces = _shared_prefix_pieces(
            backend or TransformersBackend(), model, ids, attn, settings, keys, stops, pad, chunk
        )
    else:  # plain, or keyed through transformers' generate for prompts with images (multimodal positions)
        ids, attn = ids.repeat_interleave(num_per_prompt, 0), attn.repeat_interleave(num_per_prompt, 0)
        pieces = [
            generate(
                model,
                tokenizer,
                ids[i : i + chunk],
                attn[i : i + chunk],
                max_new_tokens,
                do_sample,
                temperature,
                keys=keys[i : i + chunk] if keys is not None else None,
                stop_ids=stops,
                images=select_vision(images, slice(i, i + chunk)),
            )
            for i in range(0, ids.shape[0], chunk)
        ]
    responses, has_eos, engine_logps = _answers(pieces, stops)
    prompts = [p for p in prompt_ids(batch) for _ in range(num_per_prompt)]
    device = batch["prompt_input_ids"].device
    return pack(prompts, responses, has_eos, pad, device, images, sampling_logprobs=engine_logps)


def _shared_prefix_pieces(
    backend: GenerationBackend, model, ids, attn, settings: tuple, keys, stops, pad: int, chunk: int
) -> list:
    """What `backend` samples for left-padded prompts `ids`/`attn`, `chunk` answers at a time (whole
    groups of a prompt's answers); settings: (answers per prompt, max new tokens, temperature)."""
    num_per_prompt, max_new_tokens, temperature = settings
    per_chunk = max(1, chunk // num_per_prompt)
    pieces = []
    for i in range(0, ids.shape[0], per_chunk):
        rows = slice(i * num_per_prompt, (i + per_chunk) * num_per_prompt)
        at = slice(i, i + per_chunk)
        pieces.append(
            backend.sample(
                model, ids[at], attn[at], num_per_prompt, max_new_tokens, temperature, keys[rows], stops, pad
            )
        )
    return pieces


def _answers(pieces: list, stops) -> tuple[list[list[int]], torch.Tensor, list | None]:
    """(each answer's token ids through its first stop token, whether it stopped [N], an engine's
    log-probs of each answer's tokens or None) of sampled pieces (token tensors, or an engine's Sampled)."""
    responses, has_eos = [], []
    engine_logps = [] if any(isinstance(p, Sampled) for p in pieces) else None  # an engine's own log-probs
    for piece in pieces:
        tokens = piece.tokens if isinstance(piece, Sampled) else piece
        answers, ended = cut_at_stop(tokens, stops)
        responses += answers
        has_eos.append(ended)
        if engine_logps is not None:
            engine_logps += [logps[: len(a)] for logps, a in zip(piece.logprobs, answers)]
    return responses, torch.cat(has_eos), engine_logps
