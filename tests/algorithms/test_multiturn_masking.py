"""Masking in multi-turn episodes, in float64: the tool's tokens are context (no gradient through the
loss, the KL or the entropy), and the episode's log-probs taken in one forward are those of each turn
scored in its own context."""

from __future__ import annotations

import copy

import pytest
import torch

from alignlab.losses.grpo import GRPO_LOSS_TYPES, IMPORTANCE_SAMPLING_LEVELS, grpo_loss
from alignlab.online.generation import stop_token_ids
from alignlab.online.multiturn import Episode, ToolEnvironment, episode_samples, render_prompt, run_episodes
from alignlab.online.rollout import token_logprobs
from alignlab.tools import calculator

CALLS = {
    "123456+654321=": '<tool_call>{"name":"calculator","arguments":{"expression":"123456+654321"}}</tool_call>',
    "200000+1=": '<tool_call>{"name":"calculator","arguments":{"expression":"200000+1"}}</tool_call>',
}


@pytest.fixture(scope="module")
def tiny64(tiny):
    model, tokenizer = tiny
    return copy.deepcopy(model).double().eval(), tokenizer


def two_turn_episodes(tokenizer, stops) -> list[Episode]:
    """Two episodes that call the calculator, read its result, and answer (scripted policy turns)."""
    episodes = []
    for question in CALLS:
        opening = [{"role": "user", "content": question}]
        env = ToolEnvironment([calculator], "hermes", timeout=5.0)
        episodes.append(Episode(render_prompt(tokenizer, opening, None), opening, env))
    answers = {q: str(eval(q[:-1])) for q in CALLS}  # noqa: S307 (the test's own questions)

    def sampler(ids, attn, n, max_new, keys):
        rows = []
        for i in range(ids.shape[0]):
            text = tokenizer.decode(ids[i][attn[i].bool()])
            question = next(q for q in CALLS if q in text)
            turn = CALLS[question] if "<|im_start|>tool" not in text else answers[question]
            rows.append(tokenizer.encode(turn, add_special_tokens=False) + [stops[0]])
        width = max(map(len, rows))
        return torch.tensor([r + [tokenizer.pad_token_id] * (width - len(r)) for r in rows])

    return run_episodes(sampler, tokenizer, episodes, 1, 3, 200, stops, 8, None)


def per_turn_logprobs(model, episode: Episode) -> list[float]:
    """Each policy token's log-prob with the model run on that turn's context alone (what a sampler that
    scored each turn as it went would see): one forward per turn, over prompt + everything before it."""
    out, i = [], 0
    while i < len(episode.ids):
        if not episode.policy[i]:
            i += 1
            continue
        end = i
        while end < len(episode.ids) and episode.policy[end]:
            end += 1
        context = torch.tensor([episode.prompt_ids + episode.ids[:end]])
        with torch.no_grad():
            logits = model(input_ids=context).logits[0].double()
        start = len(episode.prompt_ids) + i
        logps = torch.log_softmax(logits[start - 1 : start - 1 + end - i], -1)
        out += logps.gather(1, context[0, start : start + end - i].unsqueeze(1)).squeeze(1).tolist()
        i = end
    return out


def test_a_two_turn_episodes_log_probs_in_one_forward_equal_each_turn_scored_alone(tiny64):
    model, tokenizer = tiny64
    stops = stop_token_ids(model, tokenizer)
    episodes = two_turn_episodes(tokenizer, stops)
    assert all(e.turns == 2 and e.tool_calls == 1 and 0 in e.policy for e in episodes)
    samples = episode_samples(episodes, tokenizer.pad_token_id, "cpu")
    with torch.no_grad():
        one_forward = token_logprobs(model, samples.seqs, samples.starts, samples.mask.shape[1])
    assert one_forward.dtype == torch.float64
    for row, episode in enumerate(episodes):
        policy = samples.mask[row].bool()
        expected = torch.tensor(per_turn_logprobs(model, episode), dtype=torch.float64)
        torch.testing.assert_close(one_forward[row][policy], expected, rtol=0, atol=1e-10)


@pytest.mark.parametrize("loss_type", GRPO_LOSS_TYPES)
@pytest.mark.parametrize("level", IMPORTANCE_SAMPLING_LEVELS)
def test_tool_tokens_get_no_gradient_from_the_loss_the_kl_or_the_entropy(tiny64, loss_type, level):
    """The update's path (grpo_update): log-probs and entropies of the whole episode in one forward,
    multiplied by the mask, into grpo_loss with a KL to a reference and an entropy bonus."""
    model, tokenizer = tiny64
    stops = stop_token_ids(model, tokenizer)
    samples = episode_samples(two_turn_episodes(tokenizer, stops), tokenizer.pad_token_id, "cpu")
    mask, length = samples.mask.double(), samples.mask.shape[1]
    with torch.no_grad():
        logps, entropy = token_logprobs(model, samples.seqs, samples.starts, length, entropy=True)
    logps, entropy = logps.clone().requires_grad_(), entropy.clone().requires_grad_()
    g = torch.Generator().manual_seed(0)
    old = (logps.detach() + 0.3 * torch.randn(logps.shape, generator=g, dtype=torch.float64)) * mask
    ref = (logps.detach() + 0.2 * torch.randn(logps.shape, generator=g, dtype=torch.float64)) * mask
    out = grpo_loss(
        logps * mask,
        old,
        torch.tensor([1.0, -0.7], dtype=torch.float64),
        mask,
        epsilon=0.2,
        epsilon_high=0.28 if loss_type != "cispo" else 5.0,
        beta=0.1,
        ref_logprobs=ref,
        loss_type=loss_type,
        max_completion_length=length,
        importance_sampling_level=level,
        entropy=entropy * mask,
        entropy_coef=0.05,
    )
    out.loss.backward()
    tool = mask == 0
    real = samples.seqs["attention_mask"].gather(1, samples.starts.unsqueeze(1) + torch.arange(length)).bool()
    assert (tool & real).sum() > 20  # the tool results' tokens are in the rows
    assert torch.equal(logps.grad[tool], torch.zeros_like(logps.grad[tool]))
    assert torch.equal(entropy.grad[tool], torch.zeros_like(entropy.grad[tool]))
    assert (logps.grad[mask.bool()] != 0).float().mean() > 0.9  # the policy's tokens do get gradients


def test_the_masked_loss_equals_the_papers_sum_over_the_policys_tokens_alone(tiny64):
    """Parameter gradients of the update's masked dapo loss (one iteration, ratio 1, no clip) equal those
    of −A·Σ log π over the policy's tokens / their count, the tokens gathered one by one."""
    model, tokenizer = tiny64
    stops = stop_token_ids(model, tokenizer)
    episodes = two_turn_episodes(tokenizer, stops)
    samples = episode_samples(episodes, tokenizer.pad_token_id, "cpu")
    mask, length = samples.mask.double(), samples.mask.shape[1]
    advantages = torch.tensor([0.8, -1.3], dtype=torch.float64)

    model.zero_grad()
    logps = token_logprobs(model, samples.seqs, samples.starts, length) * mask
    grpo_loss(logps, logps.detach(), advantages, mask, loss_type="dapo").loss.backward()
    masked = [p.grad.clone() for p in model.parameters()]

    model.zero_grad()
    total, count = 0.0, 0
    for row, episode in enumerate(episodes):
        ids = torch.tensor([episode.prompt_ids + episode.ids])
        logits = model(input_ids=ids).logits[0]
        for j, is_policy in enumerate(episode.policy):
            if is_policy:
                at = len(episode.prompt_ids) + j
                total = total - advantages[row] * torch.log_softmax(logits[at - 1], -1)[ids[0, at]]
                count += 1
    (total / count).backward()
    for got, want in zip(masked, (p.grad for p in model.parameters())):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
