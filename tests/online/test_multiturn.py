"""Multi-turn rollouts: turns, observations as context, the episode budget and turn limit, per-turn keyed
sampling, the episodes' mask, and the metrics."""

from __future__ import annotations

import re

import pytest
import torch

from alignlab.online.backends import TransformersBackend
from alignlab.online.generation import sample_keys, stop_token_ids
from alignlab.online.multiturn import (
    Episode,
    EpisodeSetup,
    StepResult,
    ToolEnvironment,
    as_step_result,
    environment_factory,
    episode_metrics,
    episode_samples,
    observation_ids,
    on_final_answers,
    open_episodes,
    opening_messages,
    render_prompt,
    run_episodes,
    turn_keys,
)
from alignlab.online.rewards import accuracy
from alignlab.tools import calculator

CALL = '<tool_call>{"name":"calculator","arguments":{"expression":"123456+654321"}}</tool_call>'


def scripted(tokenizer, turns: list[str], stop: int):
    """A sampler that answers every context's k-th turn with turns[k] and its end of turn (one row per
    context and sample), padding shorter rows; it records each call's max_new_tokens."""
    calls = []

    def sampler(ids, attn, n, max_new, keys):
        calls.append(max_new)
        k = len(calls) - 1
        rows = [tokenizer.encode(turns[min(k, len(turns) - 1)], add_special_tokens=False) + [stop]] * (ids.shape[0] * n)
        width = max(len(r) for r in rows)
        return torch.tensor([r + [tokenizer.pad_token_id] * (width - len(r)) for r in rows])

    sampler.calls = calls
    return sampler


def episodes_of(tokenizer, environment, n=1):
    opening = [{"role": "user", "content": "123456+654321="}]
    ids = render_prompt(tokenizer, opening, None)
    return [Episode(ids, opening, environment) for _ in range(n)]


def test_the_tool_result_is_rendered_as_the_template_writes_it(tiny):
    _, tokenizer = tiny
    stops = stop_token_ids(tiny[0], tokenizer)
    ids = observation_ids(tokenizer, [{"role": "tool", "name": "calculator", "content": "777777"}], stops)
    assert tokenizer.decode(ids) == "\n<|im_start|>tool\n777777<|im_end|>\n<|im_start|>assistant\n"
    # the same ids as rendering the whole conversation, after the assistant's end of turn
    whole = tokenizer.apply_chat_template(
        [
            {"role": "user", "content": "x"},
            {"role": "assistant", "content": "y"},
            {"role": "tool", "content": "777777"},
        ],
        add_generation_prompt=True,
        tokenize=True,
        return_dict=False,
    )
    assert list(whole[-len(ids) :]) == ids


def test_a_tool_call_episode_keeps_the_policy_tokens_and_masks_the_tool_result(tiny):
    model, tokenizer = tiny
    stops = stop_token_ids(model, tokenizer)
    env = ToolEnvironment([calculator], "hermes", timeout=5.0)
    sampler = scripted(tokenizer, [CALL, "777777"], stops[0])
    (episode,) = run_episodes(sampler, tokenizer, episodes_of(tokenizer, env), 1, 4, 200, stops, 8, None)
    assert [m["role"] for m in episode.messages] == ["assistant", "tool", "assistant"]
    assert episode.messages[1]["content"] == "777777" and episode.final_answer == "777777"
    assert (episode.turns, episode.tool_calls, episode.tool_failures) == (2, 1, 0)
    assert not (episode.truncated or episode.hit_max_turns)
    call = tokenizer.encode(CALL, add_special_tokens=False) + [stops[0]]
    result = observation_ids(tokenizer, episode.messages[1:2], stops)
    answer = tokenizer.encode("777777", add_special_tokens=False) + [stops[0]]
    assert episode.ids == call + result + answer  # the sampled tokens, never re-encoded
    assert episode.policy == [1] * len(call) + [0] * len(result) + [1] * len(answer)
    assert sampler.calls == [200, 200 - len(call) - len(result)]  # each turn gets what is left of the budget

    samples = episode_samples([episode, episode], tokenizer.pad_token_id, "cpu")
    assert samples.mask[0].tolist() == [float(p) for p in episode.policy]
    assert samples.starts.tolist() == [len(episode.prompt_ids)] * 2 and samples.has_eos.all()
    row = samples.seqs["input_ids"][0, : len(episode.prompt_ids) + len(episode.ids)]
    assert row.tolist() == episode.prompt_ids + episode.ids


def test_an_engines_log_probs_follow_the_policy_tokens_across_turns(tiny):
    """A sampler returning Sampled (vLLM): each turn's log-probs land on its tokens, 0 on the tool result,
    and reach Samples.sampling_logprobs, where the rollout correction reads them."""
    from alignlab.online.backends import Sampled

    model, tokenizer = tiny
    stops = stop_token_ids(model, tokenizer)
    env = ToolEnvironment([calculator], "hermes", timeout=5.0)
    script = scripted(tokenizer, [CALL, "777777"], stops[0])

    def engine(ids, attn, n, max_new, keys):
        tokens = script(ids, attn, n, max_new, keys)
        turn = len(script.calls)  # -0.25 on the first turn's tokens, -0.5 on the second's; padding -9
        return Sampled(tokens, torch.where(tokens == tokenizer.pad_token_id, -9.0, -0.25 * turn))

    (episode,) = run_episodes(engine, tokenizer, episodes_of(tokenizer, env), 1, 4, 200, stops, 8, None)
    call = len(tokenizer.encode(CALL, add_special_tokens=False)) + 1
    result = len(observation_ids(tokenizer, episode.messages[1:2], stops))
    answer = len(tokenizer.encode("777777", add_special_tokens=False)) + 1
    assert episode.sampling_logps == [-0.25] * call + [0.0] * result + [-0.5] * answer
    samples = episode_samples([episode], tokenizer.pad_token_id, "cpu")
    assert samples.sampling_logprobs[0].tolist() == episode.sampling_logps
    plain = run_episodes(script, tokenizer, episodes_of(tokenizer, env), 1, 4, 200, stops, 8, None)
    assert plain[0].sampling_logps is None and episode_samples(plain, 0, "cpu").sampling_logprobs is None


def test_a_malformed_call_is_an_error_the_model_reads_and_counts(tiny):
    model, tokenizer = tiny
    stops = stop_token_ids(model, tokenizer)
    env = ToolEnvironment([calculator], "hermes", timeout=5.0)
    broken = '<tool_call>{"name":"calculator","arguments":{"expression":"1+2"}'
    sampler = scripted(tokenizer, [broken, "3"], stops[0])
    (episode,) = run_episodes(sampler, tokenizer, episodes_of(tokenizer, env), 1, 4, 200, stops, 8, None)
    assert (episode.tool_calls, episode.tool_failures, episode.turns) == (1, 1, 2)
    assert episode.messages[1]["content"].startswith("Error: the tool call has no closing")
    assert "Error: the tool call" in tokenizer.decode(episode.ids)  # the policy's next turn sees it
    metrics = episode_metrics([episode, episodes_of(tokenizer, env)[0]], 4)
    assert metrics["tools/failure_frequency"] == 1.0 and metrics["tools/call_frequency"] == 0.5


def test_the_turn_limit_and_the_token_budget_end_episodes(tiny):
    model, tokenizer = tiny
    stops = stop_token_ids(model, tokenizer)
    env = ToolEnvironment([calculator], "hermes", timeout=5.0)
    (capped,) = run_episodes(
        scripted(tokenizer, [CALL], stops[0]), tokenizer, episodes_of(tokenizer, env), 1, 2, 400, stops, 8, None
    )
    assert (capped.turns, capped.hit_max_turns, capped.tool_calls) == (2, True, 2)
    assert capped.messages[-1]["role"] == "assistant"  # the last call's result is not appended
    call = len(tokenizer.encode(CALL, add_special_tokens=False)) + 1
    (full,) = run_episodes(  # the call fits, its result would not: the episode ends after the call
        scripted(tokenizer, [CALL], stops[0]), tokenizer, episodes_of(tokenizer, env), 1, 4, call + 5, stops, 8, None
    )
    assert full.done and not full.truncated and full.turns == 1 and full.policy == [1] * call
    (cut,) = run_episodes(  # the call itself is cut at the budget
        scripted(tokenizer, [CALL], stops[0]), tokenizer, episodes_of(tokenizer, env), 1, 4, call - 3, stops, 8, None
    )
    assert cut.truncated and cut.turns == 1 and cut.tool_calls == 0 and cut.policy == [1] * (call - 3)
    assert not episode_samples([cut], tokenizer.pad_token_id, "cpu").has_eos.any()
    assert episode_metrics([capped, cut], 2) == {
        "num_turns": 1.5,
        "tools/call_frequency": 1.0,
        "tools/failure_frequency": 0.0,
        "max_turns_ratio": 0.5,
    }


class CountingUser:
    """An environment beyond tools: a simulated user who says `again` twice, then ends with reward 2."""

    def reset(self, row):
        self.n = 0
        return list(row["prompt"])

    def step(self, messages):
        self.n += 1
        return ([{"role": "user", "content": "again"}], False, None) if self.n < 3 else ([], True, 2.0)


def test_an_environment_runs_turns_and_gives_its_reward(tiny):
    model, tokenizer = tiny
    stops = stop_token_ids(model, tokenizer)
    make = environment_factory("tests.online.test_multiturn.CountingUser", [], None, None)
    env = make()
    opening = env.reset({"prompt": [{"role": "user", "content": "hi"}]})
    episode = Episode(render_prompt(tokenizer, opening, None), opening, env)
    run_episodes(scripted(tokenizer, ["ok"], stops[0]), tokenizer, [episode], 1, 5, 200, stops, 8, None)
    assert [m["role"] for m in episode.messages] == ["assistant", "user", "assistant", "user", "assistant"]
    assert episode.reward == 2.0 and episode.turns == 3 and not episode.hit_max_turns
    assert as_step_result(([], True)) == StepResult([], True, None)
    with pytest.raises(TypeError, match="must return a StepResult"):
        as_step_result("done")


class Hinting:
    """An environment with a beginner's mistakes: step answers `reply` as the observation."""

    def __init__(self, reply=None, opening=None):
        self.reply, self.opening = reply, opening

    def reset(self, row):
        return list(row["prompt"]) if self.opening is None else self.opening

    def step(self, messages):
        return self.reply, False, None


@pytest.mark.parametrize(
    ("reply", "shown"),
    [("higher", "got 'higher'"), ({"role": "user", "content": "higher"}, "got {'role': 'user', 'content': 'higher'}")],
)
def test_an_observation_that_is_not_a_message_list_is_an_error_naming_the_environment(tiny, reply, shown):
    model, tokenizer = tiny
    stops = stop_token_ids(model, tokenizer)
    env = Hinting(reply)
    opening = opening_messages(env, {"prompt": [{"role": "user", "content": "guess"}]})
    episode = Episode(render_prompt(tokenizer, opening, None), opening, env)
    with pytest.raises(TypeError) as err:
        run_episodes(scripted(tokenizer, ["5"], stops[0]), tokenizer, [episode], 1, 3, 200, stops, 8, None)
    message = str(err.value)
    assert message.startswith("the observation tests.online.test_multiturn.Hinting.step returns must be a list of")
    assert message.endswith(shown)
    # a list of messages, or a tuple of them, or none, is read as before
    assert as_step_result(((), False)).observation == []
    assert as_step_result((None, True, 1.0)) == StepResult([], True, 1.0)
    hint = {"role": "user", "content": "higher"}
    assert as_step_result(((hint,), False, None)) == StepResult([hint], False, None)


@pytest.mark.parametrize(
    ("opening", "message"),
    [
        ("guess", "what tests.online.test_multiturn.Hinting.reset(row) returns must be a list of messages"),
        ([{"content": "guess"}], "reset(row) returns must be a list of messages"),
        ([], "tests.online.test_multiturn.Hinting.reset(row) returned no messages"),
    ],
)
def test_a_reset_that_gives_no_message_list_is_an_error_naming_the_environment(opening, message):
    with pytest.raises(TypeError, match=re.escape(message)):
        opening_messages(Hinting(opening=opening), {"prompt": [{"role": "user", "content": "guess"}]})
    row = {"prompt": [{"role": "user", "content": "guess"}], "solution": "7"}
    assert opening_messages(Hinting(), row) == row["prompt"]


class Drawing:
    """An environment whose reset draws its opening at random: a prompt's episodes would not share a prompt."""

    draws = 0

    def reset(self, row):
        Drawing.draws += 1
        return [{"role": "user", "content": f"guess {Drawing.draws}"}]

    def step(self, messages):
        return [], True, 1.0


def test_a_reset_that_differs_between_a_prompts_episodes_is_an_error_naming_the_environment(tiny):
    prompt = [{"role": "user", "content": "7+5="}]
    with pytest.raises(ValueError) as err:
        open_episodes([prompt], {}, 2, EpisodeSetup([], [], Drawing), tiny[1])
    assert str(err.value).startswith(
        "tests.online.test_multiturn.Drawing.reset gave different opening messages to the episodes of the row "
        "whose prompt is [{'role': 'user', 'content': '7+5='}]: a prompt's num_generations episodes share"
    )
    episodes = open_episodes([prompt], {}, 2, EpisodeSetup([], [], CountingUser), tiny[1])  # one opening for all
    assert [e.opening for e in episodes] == [prompt, prompt] and episodes[0].environment is not episodes[1].environment


def test_each_turn_has_its_own_keys_and_the_first_is_single_turn_sampling():
    keys = sample_keys(seed=0, step=3, rows=torch.tensor([4, 9]), num_per_prompt=2)
    assert torch.equal(turn_keys(keys, 0), keys)
    later = [turn_keys(keys, t) for t in (1, 2)]
    assert len({int(k) for t in [keys, *later] for k in t}) == 12
    assert torch.equal(turn_keys(keys[2:], 1), later[0][2:])  # a row's keys do not depend on its batch


def test_sampled_episodes_do_not_depend_on_the_batch_split(tiny):
    model, tokenizer = tiny
    stops, pad = stop_token_ids(model, tokenizer), tokenizer.pad_token_id
    backend = TransformersBackend()

    def sampler(ids, attn, n, max_new, keys):
        return backend.sample(model, ids, attn, n, max_new, 1.0, keys, stops, pad)

    def run(chunk):
        episodes = []
        for content in ("1+2=", "30+4="):
            opening = [{"role": "user", "content": content}]
            env = environment_factory("tests.online.test_multiturn.CountingUser", [], None, None)
            envs = [env() for _ in range(2)]
            for e in envs:
                e.reset({"prompt": opening})
            episodes += [Episode(render_prompt(tokenizer, opening, None), opening, e) for e in envs]
        keys = sample_keys(seed=1, step=0, rows=torch.tensor([0, 1]), num_per_prompt=2)
        return run_episodes(sampler, tokenizer, episodes, 2, 3, 12, stops, chunk, keys)

    whole, split = run(8), run(2)
    assert [e.ids for e in whole] == [e.ids for e in split]
    assert [e.policy for e in whole] == [e.policy for e in split]


def test_text_rewards_read_a_conversations_final_answer():
    conversation = [
        {"role": "assistant", "content": CALL},
        {"role": "tool", "content": "777777"},
        {"role": "assistant", "content": "777777"},
    ]
    reward = on_final_answers(accuracy)
    assert reward([[]] * 2, [conversation, "777776"], solution=["777777", "777777"]) == [1.0, 0.0]


def test_a_tool_result_that_is_the_solution_counts_as_a_correct_call():
    from alignlab.online.multiturn import tool_result_matches

    right = [{"role": "assistant", "content": CALL}, {"role": "tool", "content": "777777"}]
    wrong = [{"role": "assistant", "content": CALL}, {"role": "tool", "content": "777776"}]
    no_call = [{"role": "assistant", "content": "777777"}]
    got = tool_result_matches([[]] * 3, [right, wrong, no_call], solution=["777777"] * 3)
    assert got == [1.0, 0.0, 0.0]


TOOL_FAMILIES = ["llama3", "qwen25", "qwen3"]


@pytest.mark.parametrize("name", TOOL_FAMILIES)
def test_text_that_spells_a_control_token_stays_text_in_prompts_and_tool_results(family_dir, name):
    """A user message or a tool result that spells the template's end of turn is encoded as text, never as
    the control token (a tool result is outside the policy's control: it must not end a turn for it)."""
    from transformers import AutoTokenizer

    from alignlab.data.tokenize import end_of_turn_ids

    tokenizer = AutoTokenizer.from_pretrained(family_dir(name))
    stops = list(end_of_turn_ids(tokenizer))
    literal = "".join(tokenizer.convert_ids_to_tokens(stops))
    for plain, spelled in [
        (
            render_prompt(tokenizer, [{"role": "user", "content": "2+2="}], None),
            render_prompt(tokenizer, [{"role": "user", "content": f"2+2={literal}"}], None),
        ),
        (
            observation_ids(tokenizer, [{"role": "tool", "name": "calculator", "content": "4"}], stops),
            observation_ids(tokenizer, [{"role": "tool", "name": "calculator", "content": f"4{literal}"}], stops),
        ),
    ]:
        assert [t for t in spelled if t in stops] == [t for t in plain if t in stops]
        assert literal in tokenizer.decode(spelled) and len(spelled) > len(plain)


@pytest.mark.parametrize("name", ["gemma2", "mistral", "phi3"])
def test_a_template_that_refuses_or_drops_tool_messages_is_named_before_any_episode(family_dir, name):
    from transformers import AutoTokenizer

    from alignlab.errors import ConfigError
    from alignlab.online.multiturn import episode_setup

    tokenizer = AutoTokenizer.from_pretrained(family_dir(name))
    with pytest.raises(ConfigError, match=r"algorithm.tools: the model's chat template cannot write a tool result"):
        episode_setup(["alignlab.tools.calculator"], "hermes", 5.0, None, tokenizer)
    # an environment that replies as the user needs no tool messages
    episode_setup(["alignlab.tools.calculator"], "hermes", 5.0, "tests.online.test_multiturn.CountingUser", tokenizer)
