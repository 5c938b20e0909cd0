"""Generation backends: what samples the online algorithms' (PPO, GRPO) answers.

A backend turns a chunk of left-padded prompts into sampled answer tokens. The default,
`TransformersBackend`, runs the policy itself in this process (each prompt encoded once, its KV
cache shared by its completions, keyed sampling; see alignlab.online.generation). An inference engine in
its own memory, such as vLLM on a GPU, plugs in through the same two methods: `sync` receives the
policy before every rollout (the engine copies its weights), `sample` returns the answers, and, from an
engine, the log-prob it sampled each token with (`Sampled`), which the trainer compares with its own
(alignlab.losses.rollout_correction). Name one with `algorithm.generation_backend={_target_:
package.module.Class, ...}`; its other keys are passed to the class. vLLM: `algorithm.use_vllm=true`
(alignlab.online.vllm_backend).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple, Protocol

import torch

from alignlab.errors import ConfigError
from alignlab.online.generation import sample_shared_prefix


class Sampled(NamedTuple):
    """What an engine's `sample` may return instead of bare tokens."""

    tokens: torch.Tensor  # [B·num_per_prompt, R] answer tokens, as GenerationBackend.sample describes them
    logprobs: torch.Tensor  # [B·num_per_prompt, R] the engine's log-prob of each token at the sampling
    # temperature (float32; any value after a row's stop token)


class GenerationBackend(Protocol):
    """What samples the online algorithms' answers; a backend of your own defines both methods.

    A subclass (or any class with these two methods: this is a Protocol) defines `sync(model)`, called
    before every rollout with the live policy (copy its weights into an engine, or nothing for a
    sampler that runs the policy itself), and `sample(...)`, the answers to a chunk of left-padded
    prompts in the layout described there. Its constructor takes the keys of
    `algorithm.generation_backend` besides `_target_`; `build_backend` refuses a class lacking either
    method. `TransformersBackend` is the smallest example, `alignlab.online.vllm_backend.VLLMBackend` a
    full engine.
    """

    def sync(self, model: torch.nn.Module) -> None:
        """Called before each rollout with the policy whose current weights the samples must follow."""

    def sample(
        self,
        model: torch.nn.Module,
        prompt_input_ids: torch.Tensor,
        prompt_attention_mask: torch.Tensor,
        num_per_prompt: int,
        max_new_tokens: int,
        temperature: float,
        keys: torch.Tensor,
        stop_ids: Sequence[int],
        pad_id: int,
    ) -> torch.Tensor | Sampled:
        """[B·num_per_prompt, ≤ max_new_tokens] answer tokens (a prompt's answers in consecutive rows),
        each row padded with pad_id after its first token in `stop_ids` (every id that ends an answer:
        the chat template's end of turn and each eos id, alignlab.online.generation.stop_token_ids; an engine
        must stop at any of them, e.g. vLLM's `stop_token_ids`). `keys` ([B·num_per_prompt] ints) make
        sampling reproducible where the backend can use them. An engine returns Sampled(those tokens,
        their sampling log-probs) instead; the in-process sampler returns the tokens alone (the trainer's
        own log-probs are its sampling log-probs)."""


class TransformersBackend:
    """The policy samples its own answers, in this process, with keyed sampling."""

    def sync(self, model: torch.nn.Module) -> None:  # it samples from the live policy: nothing to copy
        pass

    sample = staticmethod(sample_shared_prefix)


def check_backend_spec(spec: Any) -> None:
    """Before any model loads: null, or a mapping whose `_target_` imports."""
    if spec is None:
        return
    if not hasattr(spec, "get") or not spec.get("_target_"):
        raise ConfigError(
            f"algorithm.generation_backend must be null or {{_target_: package.module.Class, ...}}, got {spec!r}"
        )
    from hydra.utils import get_class

    try:
        get_class(spec["_target_"])
    except Exception as e:
        raise ConfigError(f"algorithm.generation_backend {spec['_target_']!r} could not be imported: {e}") from None


def build_backend(spec: Any) -> GenerationBackend:
    """null: TransformersBackend; a mapping with `_target_`: that class, built with the other keys."""
    if spec is None:
        return TransformersBackend()
    check_backend_spec(spec)
    from hydra.utils import instantiate

    try:
        backend = instantiate(spec)
    except Exception as e:
        raise ConfigError(f"algorithm.generation_backend {spec['_target_']!r} could not be built: {e}") from None
    missing = [m for m in ("sync", "sample") if not callable(getattr(backend, m, None))]
    if missing:
        raise ConfigError(
            f"algorithm.generation_backend {spec['_target_']!r} lacks {' and '.join(missing)} "
            "(see alignlab.online.backends.GenerationBackend)"
        )
    return backend
