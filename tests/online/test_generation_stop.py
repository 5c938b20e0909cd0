"""Generation stops where the model stops: at the chat template's end of turn, at every id of the
model's generation_config.eos_token_id and at the tokenizer's eos, for every family, in greedy
evaluation, keyed sampling (PPO, GRPO) and generate(); answers are cut there."""

from __future__ import annotations

import functools

import pytest
import torch

from alignlab.online.generation import answer_texts, cut_at_stop, exact_match, generate, sample_keys, stop_token_ids
from tests.families import FAMILIES

# The tokens that end an answer, per family: end of turn, generation_config's eos list, tokenizer eos.
STOPS = {
    "llama3": ["<|eot_id|>", "<|end_of_text|>"],
    "qwen25": ["<|im_end|>", "<|endoftext|>"],
    "qwen3": ["<|im_end|>", "<|endoftext|>"],
    "mistral": ["</s>"],
    "gemma2": ["<end_of_turn>", "<eos>"],
    "gemma3": ["<end_of_turn>", "<eos>"],
    "phi3": ["<|end|>", "<|endoftext|>", "<|assistant|>"],
    "gpt2": ["<|endoftext|>"],
    "llama_base": ["</s>"],
}
CASES = [(family, stop) for family in FAMILIES for stop in STOPS[family]]
ANSWER = "42"


@functools.cache
def family(folder: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)


class Forced:
    """Makes `model` answer any prompt with `answer` (token ids) and then `stop`: its output layer puts
    +20 on the successor of each input token (answer[0] after anything else, answer[i+1] after
    answer[i], `stop` after the last) and −20 elsewhere, so whatever follows `stop` starts the answer
    again: a generator that does not stop at `stop` runs on to its length limit."""

    def __init__(self, model, answer: list[int], stop: int):
        vocab = model.get_output_embeddings().weight.shape[0]
        self.successor = torch.full((vocab,), answer[0])
        for a, b in zip(answer, [*answer[1:], stop]):
            self.successor[a] = b
        self.ids = None
        self.hooks = [
            model.register_forward_pre_hook(self.remember, with_kwargs=True),
            model.register_forward_hook(self.forget),
            model.get_output_embeddings().register_forward_hook(self.logits),
        ]

    def remember(self, module, args, kwargs):
        self.ids = kwargs.get("input_ids", args[0] if args else None)

    def forget(self, module, args, output):
        self.ids = None

    def logits(self, module, args, output):
        if self.ids is None:
            return output
        last = self.ids[:, -output.shape[1] :]  # the positions whose logits the model keeps
        forced = torch.full_like(output, -20.0)
        return forced.scatter(-1, self.successor[last].unsqueeze(-1).to(output.device), 20.0)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for hook in self.hooks:
            hook.remove()


def prompts(tokenizer) -> dict:
    """Two left-padded prompts of different lengths, through the chat template where there is one."""
    from alignlab.data.collate import collate_prompts

    questions = ["What is six times seven?", "And 40 + 2?"]
    if tokenizer.chat_template:
        from alignlab.data.tokenize import encode_prompts

        ids = encode_prompts(tokenizer, [[{"role": "user", "content": q}] for q in questions])
    else:
        ids = [tokenizer(f"Q: {q} A:")["input_ids"] for q in questions]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    batch = collate_prompts(ids, pad)
    batch["index"], batch["solution"] = torch.arange(2), [ANSWER, ANSWER]
    return batch


@pytest.mark.parametrize("name", FAMILIES)
def test_stop_token_ids_are_the_families_end_tokens(family_dir, name):
    model, tokenizer = family(str(family_dir(name)))
    assert stop_token_ids(model, tokenizer) == tokenizer.convert_tokens_to_ids(STOPS[name])


@pytest.mark.parametrize(("name", "stop"), CASES)
def test_every_generation_path_stops_at_each_end_token(family_dir, name, stop):
    """The model is forced to answer "42" and then `stop`: generate(), keyed sampling with a shared
    prompt cache, PPO/GRPO's rollout sampling (keyed and plain) and greedy exact match all end the
    answer there, with the stop token counted as the answer's end and nothing after it."""
    from alignlab.online.rollout import sample
    from tests.conftest import build_module

    model, tokenizer = family(str(family_dir(name)))
    if tokenizer.pad_token_id is None:  # as alignlab.models.loading does for a tokenizer without one
        tokenizer.pad_token = tokenizer.eos_token
    answer, stop_id = tokenizer(ANSWER, add_special_tokens=False)["input_ids"], tokenizer.convert_tokens_to_ids(stop)
    expected = [*answer, stop_id]
    batch = prompts(tokenizer)
    ids, attention = batch["prompt_input_ids"], batch["prompt_attention_mask"]
    stops = stop_token_ids(model, tokenizer)
    with Forced(model, answer, stop_id):
        tokens = generate(model, tokenizer, ids, attention, max_new_tokens=8)
        assert tokens.tolist() == [expected, expected]  # stopped: not 8 tokens
        answers, ended = cut_at_stop(tokens, stops)
        assert answers == [expected, expected] and ended.tolist() == [True, True]
        assert answer_texts(tokenizer, answers, ended) == [ANSWER, ANSWER]  # the stop token is not text

        keys = sample_keys(seed=0, step=0, rows=batch["index"], num_per_prompt=2)
        sampled = generate(
            model, tokenizer, ids.repeat_interleave(2, 0), attention.repeat_interleave(2, 0), 8, True, 1.0, keys
        )
        assert sampled.tolist() == [expected] * 4

        for step in (0, None):  # keyed (sample_shared_prefix through the backend) and plain generate()
            samples = sample(model, tokenizer, batch, 8, 1.0, chunk=4, num_per_prompt=2, step=step)
            assert samples.responses == [expected] * 4
            assert samples.has_eos.tolist() == [True] * 4
            assert samples.mask.sum(1).tolist() == [len(expected)] * 4

        module = build_module("sft", model, tokenizer)
        texts = module.greedy_answers(batch)[1]
        assert texts == [ANSWER, ANSWER]
        assert module.exact_match(batch).tolist() == [1.0, 1.0]
        assert exact_match(texts, ["43", ANSWER]).tolist() == [0.0, 1.0]


def test_shared_prefix_sampling_stops_at_any_listed_id(family_dir):
    """sample_shared_prefix with the stop list given directly: a row ends at whichever listed token it
    draws, and a token not on the list does not end it."""
    from alignlab.online.generation import sample_shared_prefix

    model, tokenizer = family(str(family_dir("llama3")))
    answer = tokenizer(ANSWER, add_special_tokens=False)["input_ids"]
    eot, eos = tokenizer.convert_tokens_to_ids(["<|eot_id|>", "<|end_of_text|>"])
    batch = prompts(tokenizer)
    keys = sample_keys(seed=0, step=0, rows=batch["index"], num_per_prompt=2)
    args = (model, batch["prompt_input_ids"], batch["prompt_attention_mask"], 2, 6, 1.0, keys)
    with Forced(model, answer, eot):
        assert sample_shared_prefix(*args, [eos, eot], 0).tolist() == [[*answer, eot]] * 4
        unstopped = sample_shared_prefix(*args, [eos], 0)  # eot alone is not on this list: runs to 6 tokens
        assert unstopped.shape == (4, 6) and unstopped[0, len(answer)] == eot


@pytest.mark.parametrize(("name", "stop"), [("gemma2", "<end_of_turn>"), ("llama3", "<|eot_id|>"), ("phi3", "<|end|>")])
def test_grpo_treats_the_end_of_turn_as_the_answers_end(family_dir, name, stop):
    """GRPO on a model that ends its turn with a token other than the tokenizer's eos: the rewards see
    the text before it, the stop token is the last answer token trained on, nothing counts as cut off."""
    from tests.conftest import build_module

    model, tokenizer = family(str(family_dir(name)))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    answer, stop_id = tokenizer(ANSWER, add_special_tokens=False)["input_ids"], tokenizer.convert_tokens_to_ids(stop)
    assert stop_id != tokenizer.eos_token_id
    batch = prompts(tokenizer)
    batch["prompt_messages"] = [[{"role": "user", "content": "?"}]] * 2
    batch["columns"] = {"solution": ["43", ANSWER]}
    module = build_module("grpo", model, tokenizer, num_generations=2, max_completion_length=8)
    with Forced(model, answer, stop_id):
        gen = module.generate_batch(batch)
    assert gen["texts"] == [ANSWER] * 4
    assert gen["mask"].sum(1).tolist() == [len(answer) + 1] * 4
    starts = gen["starts"].tolist()
    assert [gen["input_ids"][i, starts[i] + len(answer)].item() for i in range(4)] == [stop_id] * 4
    assert gen["stats"]["completions/clipped_ratio"].item() == 0.0
    assert gen["stats"]["reward"].item() == 0.5  # "42" against solutions "43" and "42"


def test_cut_at_stop():
    eos = 9
    tokens = torch.tensor([[5, 9, 7, 9], [5, 6, 7, 8], [9, 5, 5, 5]])
    answers, has_eos = cut_at_stop(tokens, [eos])
    assert answers == [[5, 9], [5, 6, 7, 8], [9]]  # through the first eos; all 4 tokens without one
    assert has_eos.tolist() == [True, False, True]


def test_cut_at_the_first_of_any_stop_token():
    """End of turn (9) and two eos ids (4, 8): each answer ends at whichever comes first."""
    tokens = torch.tensor([[5, 8, 9, 7], [5, 6, 4, 9], [9, 8, 4, 5], [5, 6, 7, 3]])
    answers, has_eos = cut_at_stop(tokens, [9, 4, 8])
    assert answers == [[5, 8], [5, 6, 4], [9], [5, 6, 7, 3]]
    assert has_eos.tolist() == [True, True, True, False]
