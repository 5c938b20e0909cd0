"""Answer log-probabilities from a causal LM: the one place every algorithm gets them from."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint

from alignlab.data.vision import select_vision
from alignlab.models.modes import evaluating
from alignlab.models.vision import forward_inputs, trunk


@dataclass
class AnswerLogps:
    """Per-sequence statistics over the answer tokens of a batch of N sequences."""

    logps: torch.Tensor  # [N] sum of log π(y_t | x, y_<t) over answer tokens
    num_tokens: torch.Tensor  # [N] answer tokens per sequence
    token_logps: torch.Tensor  # [N, T-1] per-token log-probs, 0 outside the answer
    mask: torch.Tensor  # [N, T-1] 1 where the predicted token is an answer token
    mean_logits: torch.Tensor  # [N] mean logit over answer positions and vocabulary (detached)
    # [N, T-1] each answer position's entropy, on request (detached unless asked with entropy_grad)
    token_entropy: torch.Tensor | None = None
    token_argmax: torch.Tensor | None = None  # [N, T-1] 1 where the answer token is the argmax logit (detached)
    # [N, T-1] log Σ_v π(v | x, y_<t)² at each answer position, on request (detached; WPO's weights)
    token_log_sum_sq_probs: torch.Tensor | None = None

    @property
    def avg_logps(self) -> torch.Tensor:
        """Length-normalised log-prob: sum / number of answer tokens."""
        return self.logps / self.num_tokens.clamp(min=1)

    def rows(self, sl: slice) -> AnswerLogps:
        """The statistics of a slice of the sequences (e.g. the chosen half of a pairwise batch)."""
        optional = [
            None if t is None else t[sl] for t in (self.token_entropy, self.token_argmax, self.token_log_sum_sq_probs)
        ]
        return AnswerLogps(
            self.logps[sl], self.num_tokens[sl], self.token_logps[sl], self.mask[sl], self.mean_logits[sl], *optional
        )

    def split_pairs(self, n_pairs: int) -> tuple[AnswerLogps, AnswerLogps]:
        """(chosen, rejected) halves of a pairwise batch laid out as B chosen then B rejected."""
        return self.rows(slice(0, n_pairs)), self.rows(slice(n_pairs, 2 * n_pairs))


def selective_log_softmax(logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """log_softmax(logits)[..., index] without materialising the full log-softmax tensor."""
    if logits.dtype in (torch.float16, torch.bfloat16):  # log-probs in half precision lose the tails
        logits = logits.float()
    return torch.gather(logits, -1, index.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


@dataclass(frozen=True)
class LogitTransform:
    """What a causal LM's forward does to its output layer's logits, in this order: multiply by
    `multiply`, divide by `divide`, then soft-cap as `softcap`·tanh(logits / `softcap`). None: skip."""

    multiply: float | None = None
    divide: float | None = None
    softcap: float | None = None

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        if self.multiply is not None:
            logits = logits * self.multiply
        if self.divide is not None:
            logits = logits / self.divide
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


def _softcap(config) -> LogitTransform:  # Gemma-2/3 and kin: final_logit_softcapping (None: off)
    return LogitTransform(softcap=config.final_logit_softcapping)


def _times_logit_scale(config) -> LogitTransform:  # Cohere: logits * logit_scale
    return LogitTransform(multiply=config.logit_scale)


def _over_logits_scaling(config) -> LogitTransform:  # Granite (µP): logits / logits_scaling
    return LogitTransform(divide=config.logits_scaling)


# What each architecture's ForCausalLM.forward applies after its output layer (transformers 5.24), by
# config.model_type; a type not listed applies nothing. Each entry is tested against the model's own
# forward (tests/models/test_architectures.py); an architecture whose forward does something else is caught
# on the first batch (check_answer_logprobs) and scored through its forward instead.
LOGIT_TRANSFORMS = {
    "gemma2": _softcap,
    "gemma3_text": _softcap,
    "vaultgemma": _softcap,
    "nanochat": _softcap,
    "beam": _softcap,
    "cohere": _times_logit_scale,
    "cohere2": _times_logit_scale,
    "cohere2_moe": _times_logit_scale,
    "granite": _over_logits_scaling,
    "granite_swa": _over_logits_scaling,
    "granitemoe": _over_logits_scaling,
    "granitemoeshared": _over_logits_scaling,
    "granitemoe_swa": _over_logits_scaling,
    "minicpm3": _over_logits_scaling,  # divides the hidden states before its bias-free output layer
    "hyperclovax": lambda config: LogitTransform(multiply=config.logits_scaling),  # multiplies, unlike Granite
}


def logit_transform(model) -> LogitTransform:
    """The transform `model`'s forward applies to its output layer's logits (see LOGIT_TRANSFORMS)."""
    config = model.config
    rule = LOGIT_TRANSFORMS.get(config.model_type)
    return rule(config) if rule is not None else LogitTransform()


def architecture(model) -> type:
    """The model class behind any PEFT wrapper: what decides how logits are computed."""
    return type(model.get_base_model()) if hasattr(model, "get_base_model") else type(model)


# Architectures found on a first batch to compute logits otherwise than their output layer and
# LOGIT_TRANSFORMS say (see check_answer_logprobs): their log-probs come from their full forward.
_SCORED_BY_FORWARD: set[type] = set()


def scores_by_forward(model) -> bool:
    """Whether `model`'s answer log-probs come from its full forward rather than the answer-only path."""
    return architecture(model) in _SCORED_BY_FORWARD


def score_by_forward(model, reason: str) -> None:
    """From now on, take `model`'s architecture's log-probs from its full forward; warns once."""
    arch = architecture(model)
    if arch in _SCORED_BY_FORWARD:
        return
    _SCORED_BY_FORWARD.add(arch)
    warnings.warn(
        f"{arch.__name__} (model_type {model.config.model_type!r}): answer log-probs from its output layer "
        f"differ from its own forward ({reason}), so it applies a logit transform alignlab does not know; "
        "log-probs now come from the full forward (correct, but with full-vocabulary logits for the whole "
        "batch: more memory). Please report the architecture.",
        stacklevel=2,
    )


# Answer positions per output-layer call. Logits exist for one chunk at a time (and are recomputed in
# the backward pass rather than kept): with a 150k-token vocabulary, 1024 positions are 0.6 GB in
# float32, where a whole batch's logits would be many GB. 0: every answer position at once.
CHUNK_SIZE = 1024


def _score_chunk(
    hidden: torch.Tensor,
    targets: torch.Tensor,
    head: torch.nn.Module,
    transform: LogitTransform,
    temperature: float,
    entropy: bool,
    entropy_grad: bool = False,
    sum_sq_probs: bool = False,
):
    """(log-prob of each target, mean logit, entropy or None, whether the target is the argmax,
    log Σ_v p_v² or None) for hidden states [K, H]. The entropy carries gradients with `entropy_grad`
    (an entropy bonus)."""
    logits = transform(head(hidden))  # in the model's dtype, as its forward does, so the numbers are its own
    if logits.dtype in (torch.float16, torch.bfloat16):  # log-probs in half precision lose the tails
        logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    logps = selective_log_softmax(logits, targets)
    ent = None
    if entropy:
        with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
            logp = torch.log_softmax(logits, -1)
            ent = -(logp.exp() * logp).sum(-1)
    with torch.no_grad():
        mean_logit = logits.mean(-1)
        argmax = logits.argmax(-1) == targets  # TRL's mean_token_accuracy counts these
        sum_sq = torch.logsumexp(2 * torch.log_softmax(logits, -1), -1) if sum_sq_probs else None
    return logps, mean_logit, ent, argmax, sum_sq


# Architectures (config.model_type) whose decoder, given attention_mask=None and position_ids that restart
# at 0 for each sequence of a packed row, attends block-diagonally: transformers' create_causal_mask finds
# the restarts (masking_utils.find_packed_sequence_indices) and masks attention across them, and rotary
# embeddings read position_ids. Each is tested against the padded batch (tests/models/test_padding_free.py).
PADDING_FREE_ARCHITECTURES = frozenset({"llama", "mistral", "qwen2", "qwen3", "phi3", "olmo2", "granite"})
# Attention implementations whose masks honour the restarts in 5.24 and were tested on CPU. flash_attention_2
# turns them into varlen calls too, but is untested here (no CUDA flash-attn build in the test environment).
PADDING_FREE_ATTENTION = frozenset({"sdpa", "eager"})


def padding_free_refusal(model) -> str | None:
    """Why `model` cannot score a packed row (None: it can): an architecture or attention implementation
    outside PADDING_FREE_ARCHITECTURES / PADDING_FREE_ATTENTION, or sliding-window layers."""
    config = model.config
    if config.model_type not in PADDING_FREE_ARCHITECTURES:
        return f"model_type {config.model_type!r} is not one tested packed ({sorted(PADDING_FREE_ARCHITECTURES)})"
    attention = getattr(config, "_attn_implementation", None)
    if attention not in PADDING_FREE_ATTENTION:
        return f"attention implementation {attention!r} is not one tested packed ({sorted(PADDING_FREE_ATTENTION)})"
    layer_types = getattr(config, "layer_types", None) or []
    if getattr(config, "sliding_window", None) is not None or any(t != "full_attention" for t in layer_types):
        return "it has sliding-window attention layers (untested packed)"
    return None


def enable_padding_free(model) -> bool:
    """Let answer_logprobs score `model`'s batches as one packed row from now on (model.padding_free):
    True when done; when `model` cannot (padding_free_refusal), warns once and returns False."""
    reason = padding_free_refusal(model)
    if reason is not None:
        warnings.warn(f"model.padding_free=true is ignored: {reason}; batches stay padded.", stacklevel=2)
        return False
    model.padding_free = True  # an attribute of the model object: a deep copy (the reference) keeps it
    return True


# Tokens per packed row; 0: the batch's longest sequence. Rows are filled first-fit with the sequences,
# longest first, so a packed batch never has more rows, row length or attention pairs than the padded one.
PACKED_ROW_TOKENS = 0


def _packed(ids: torch.Tensor, attention: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids [R, W], position_ids [R, W], where [N, T]): the real tokens of a right-padded batch
    [N, T] laid out sequence after sequence in R ≤ N rows of W tokens, each sequence's positions counting
    from 0 (as in the padded forward); where[r, c] is token (r, c)'s index in the flattened rows. A row's
    unused tail holds pad tokens at position 0: each its own one-token sequence, attended by nothing else."""
    lengths = attention.sum(-1).tolist()
    capacity = max(PACKED_ROW_TOKENS, max(lengths, default=0))
    fill, row_of, offset = [], [0] * len(lengths), [0] * len(lengths)  # tokens used in each packed row
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        row = next((r for r, used in enumerate(fill) if used + lengths[i] <= capacity), len(fill))
        if row == len(fill):
            fill.append(0)
        row_of[i], offset[i], fill[row] = row, fill[row], fill[row] + lengths[i]
    width = max(max(fill), 1)
    start = [r * width + o for r, o in zip(row_of, offset)]
    keep = attention.bool()
    where = torch.tensor(start, device=ids.device)[:, None] + torch.arange(ids.shape[1], device=ids.device)
    packed_ids = ids.new_zeros(len(fill) * width).index_put_((where[keep],), ids[keep])
    positions = ids.new_zeros(len(fill) * width).index_put_((where[keep],), (attention.cumsum(-1) - 1)[keep])
    return packed_ids.view(len(fill), width), positions.view(len(fill), width), where


def _answer_states(model, batch: dict, by_forward: bool | None, padding_free: bool | None) -> tuple:
    """The decoder's output at a batch's answer positions and what turns it into logits: (states [K, H],
    the tokens they predict [K], their rows [K] and columns [K] in the shifted batch, the shifted
    loss_mask [N, T-1], the output layer, the architecture's LogitTransform). K answer positions, row by
    row. With `by_forward` the states are the full forward's logits and the head the identity. See
    answer_logprobs for `by_forward` and `padding_free`."""
    if by_forward is None:
        by_forward = scores_by_forward(model)
    if padding_free is None:
        padding_free = bool(getattr(model, "padding_free", False))
    if padding_free and (reason := padding_free_refusal(model)) is not None:
        raise ValueError(f"padding_free: {reason}")
    ids, attention = batch["input_ids"], batch["attention_mask"]
    if padding_free:
        packed_ids, positions, where = _packed(ids, attention)
        inputs = {"input_ids": packed_ids, "position_ids": positions, "attention_mask": None}
    else:
        inputs = {"input_ids": ids, "attention_mask": attention}
    inputs.update(forward_inputs(model, ids, batch))  # a vision-language batch's images (none for text)
    if by_forward:  # full logits, then the same gathering; the "head" is the identity
        hidden = model(**inputs, use_cache=False).logits
        head, transform = torch.nn.Identity(), LogitTransform()
    else:
        hidden = trunk(model)(**inputs, use_cache=False).last_hidden_state
        head, transform = model.get_output_embeddings(), logit_transform(model)
    mask = batch["loss_mask"][:, 1:]
    rows, cols = mask.nonzero(as_tuple=True)  # answer positions, row by row
    states = hidden.flatten(0, 1)[where[rows, cols]] if padding_free else hidden[rows, cols]
    targets = ids[:, 1:][rows, cols]
    return states, targets, rows, cols, mask, head, transform


def answer_logits(
    model, batch: dict, temperature: float = 1.0, by_forward: bool | None = None, padding_free: bool | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits [K, V] at a batch's K answer positions, each position's row [K]), row by row in the order
    answer_logprobs scores them: whole next-token distributions, for a loss between two models'
    distributions (GKD). As answer_logprobs, the output layer runs at answer positions only, with the
    architecture's logit transform, divided by `temperature`; float32 for half-precision models. Unlike
    it, the K × V logits are kept (with their graph where gradients flow): memory grows with answer
    tokens × vocabulary."""
    states, _, rows, _, _, head, transform = _answer_states(model, batch, by_forward, padding_free)
    logits = transform(head(states))
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    return (logits / temperature if temperature != 1.0 else logits), rows


def answer_logprobs(
    model,
    batch: dict,
    temperature: float = 1.0,
    entropy: bool = False,
    chunk_size: int = CHUNK_SIZE,
    by_forward: bool | None = None,
    padding_free: bool | None = None,
    entropy_grad: bool = False,
    sum_sq_probs: bool = False,
) -> AnswerLogps:
    """Forward `batch` (input_ids, attention_mask, loss_mask) and score its answer tokens.

    Position t predicts token t+1. The decoder runs over the whole batch, but the output layer only
    at answer positions, `chunk_size` of them at a time, each chunk's logits recomputed in the backward
    pass instead of stored: no full-vocabulary logits for the batch ever exist. The architecture's
    logit transform (LOGIT_TRANSFORMS: soft-capping, logit scaling) is applied as its forward does, so
    the log-probs are log_softmax(model(...).logits) at the answer tokens. Online algorithms score
    sampled answers under the sampling distribution: logits / temperature. `by_forward` (default: as
    check_answer_logprobs decided for the architecture) takes the logits from the model's full forward.

    `padding_free` (default: the model's `padding_free` attribute, see enable_padding_free) runs the
    decoder on the batch's real tokens only, sequence after sequence in rows no longer than its longest
    sequence (_packed), with position_ids restarting at 0 and no attention mask (TRL's padding_free; the
    rows must be right-padded, as collate_answers makes them); the numbers equal the padded forward's to
    rounding. Raises ValueError when asked for on a model padding_free_refusal refuses.

    `entropy` adds each answer position's entropy (token_entropy), detached unless `entropy_grad`
    (for an entropy bonus in the loss); `sum_sq_probs` adds log Σ_v π(v)² (token_log_sum_sq_probs, detached).
    """
    states, targets, rows, cols, mask, head, transform = _answer_states(model, batch, by_forward, padding_free)
    options = (temperature, entropy, entropy_grad, sum_sq_probs)
    pieces = _score_chunks(states, targets, head, transform, chunk_size, options)
    dtype = torch.float32 if states.dtype in (torch.float16, torch.bfloat16) else states.dtype
    logps = torch.cat([p[0] for p in pieces]) if pieces else states.new_zeros(0, dtype=dtype)
    token_logps = torch.zeros(mask.shape, dtype=logps.dtype, device=logps.device).index_put((rows, cols), logps)
    mask = mask.to(logps.dtype)
    num_tokens = mask.sum(-1)
    token_entropy = None
    if entropy:
        with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
            values = torch.cat([p[2] for p in pieces]) if pieces else logps.detach()
            token_entropy = torch.zeros_like(token_logps).index_put((rows, cols), values)
    mean_logits, argmax, sum_sq = _detached_stats(pieces, logps, token_logps, num_tokens, rows, cols, sum_sq_probs)
    return AnswerLogps(token_logps.sum(-1), num_tokens, token_logps, mask, mean_logits, token_entropy, argmax, sum_sq)


def _score_chunks(states, targets, head, transform, chunk_size: int, options: tuple) -> list[tuple]:
    """_score_chunk's outputs for the K answer positions, `chunk_size` at a time (all at once for 0),
    each chunk recomputed in the backward pass where gradients flow. `options`: (temperature, entropy,
    entropy_grad, sum_sq_probs) as answer_logprobs takes them."""
    step = chunk_size if chunk_size > 0 else max(len(targets), 1)
    pieces = []
    for start in range(0, len(targets), step):
        args = (states[start : start + step], targets[start : start + step], head, transform, *options)
        if torch.is_grad_enabled() and states.requires_grad:
            pieces.append(checkpoint(_score_chunk, *args, use_reentrant=False))
        else:
            pieces.append(_score_chunk(*args))
    return pieces


@torch.no_grad()
def _detached_stats(pieces, logps, token_logps, num_tokens, rows, cols, sum_sq_probs: bool) -> tuple:
    """(mean logit per sequence [N], argmax token per position [N, T-1], log Σ π² per position [N, T-1]
    or None) from the chunks' outputs, without gradients."""
    mean_logit = torch.cat([p[1] for p in pieces]) if pieces else logps.detach()
    mean_logits = torch.zeros_like(num_tokens).index_add(0, rows, mean_logit) / num_tokens.clamp(min=1)
    argmax = torch.cat([p[3] for p in pieces]).to(logps.dtype) if pieces else logps.detach()
    token_argmax = torch.zeros_like(token_logps).index_put((rows, cols), argmax)
    sum_sq = None
    if sum_sq_probs:
        values = torch.cat([p[4] for p in pieces]) if pieces else logps.detach()
        sum_sq = torch.zeros_like(token_logps).index_put((rows, cols), values.to(token_logps.dtype))
    return mean_logits, token_argmax, sum_sq


# Largest |difference| in a token's log-prob (nats) that check_answer_logprobs puts down to rounding,
# by the dtype of the model's logits. In half precision the two paths round the same logits apart by
# up to an ulp (0.125 at 30 in bfloat16); a transform left out (a scale, a cap, a bias) moves them more.
CHECK_TOLERANCE = {torch.float64: 1e-6, torch.float32: 1e-3, torch.float16: 0.1, torch.bfloat16: 0.5}


def scoring_rows(batch: dict, rows: int = 2) -> dict:
    """A batch for check_answer_logprobs from the first `rows` rows of any batch alignlab trains on:
    prompt + answer rows (input_ids, attention_mask), or prompts alone (prompt_input_ids,
    prompt_attention_mask; PPO, GRPO), right-padded (left padding leaves some attention
    implementations rows with nothing to attend to). Every token after the first is scored. The rows'
    images come along (alignlab.data.vision)."""
    if "input_ids" in batch:
        ids, attention = batch["input_ids"][:rows], batch["attention_mask"][:rows]
    else:
        ids, attention = batch["prompt_input_ids"][:rows], batch["prompt_attention_mask"][:rows]
    order = torch.argsort((attention == 0).int(), dim=1, stable=True)  # real tokens first, in order
    ids, attention = ids.gather(1, order), attention.gather(1, order)
    loss_mask = attention.clone()
    loss_mask[:, 0] = 0
    images = select_vision(batch, slice(0, rows))
    return {"input_ids": ids, "attention_mask": attention, "loss_mask": loss_mask, **images}


@torch.no_grad()
def check_answer_logprobs(model, batch: dict) -> tuple[float, float]:
    """(largest |difference| between answer_logprobs' answer-only path and log_softmax of the model's
    own forward over the scored tokens of `batch`, the tolerance for the forward's logits dtype).

    Run once on a first batch (AlignmentModule does, see score_by_forward): an architecture whose
    forward applies a transform LOGIT_TRANSFORMS does not know shows here, before any step trains on
    wrong numbers. Cheap: one extra forward of a few rows without gradients.
    """
    with evaluating(model):  # dropout would make the two passes differ
        fast = answer_logprobs(model, batch, by_forward=False, padding_free=False)
        images = forward_inputs(model, batch["input_ids"], batch)
        logits = model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False, **images
        ).logits
    reference = selective_log_softmax(logits[:, :-1], batch["input_ids"][:, 1:])
    gap = torch.where(fast.mask.bool(), fast.token_logps - reference, 0.0).abs()
    difference = gap.max().item() if gap.numel() else 0.0
    return difference, CHECK_TOLERANCE.get(logits.dtype, 1e-3)
