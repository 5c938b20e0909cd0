"""Multi-turn rollouts: the policy answers, a tool or an environment replies, the policy answers again.

An episode starts from a prompt (the data row's messages, or what an environment's `reset` gives) and
runs turns: the policy samples an assistant turn; the environment's `step` reads the conversation and
either ends the episode (with an optional reward) or replies with observation messages (tool results,
a simulated user), which the chat template renders as context; then the policy continues, up to
`max_turns` assistant turns and `max_completion_length` tokens after the prompt (as TRL counts them:
the policy's tokens and the observations' together).

The episode is one sequence, prompt + everything after it, scored in one forward pass; its mask is 1 on
the tokens the policy sampled and 0 on observation tokens, which are context only: the loss, the KL
and the entropy see the policy's tokens, and its log-probs are those of the whole sequence, exactly as
the update will score it. The policy's own tokens are kept as sampled (never decoded and encoded
again); an observation's tokens are what the template writes for it after an assistant turn (found
as TRL does, from a minimal conversation, so no template needs to re-render earlier turns alike).

Sampling stays keyed: turn 0 draws with the single-turn keys (seed, step, data row, sample), turn t
with those keys mixed with t (`turn_keys`), so an episode samples the same whatever the batch split or
process count.

`ToolEnvironment` is the environment behind `algorithm.tools`: its step runs the tool calls in the last
assistant turn (alignlab.online.tools) and ends the episode at a turn without one. Any class with
`reset(row) -> messages` and `step(messages) -> StepResult` (or a tuple (messages, done, reward)) is an
environment (`algorithm.environment`, by dotted path; one instance per episode).
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

import torch

from alignlab.data.collate import collate_answers, pad
from alignlab.data.tokenize import encode_prompts, template_writes_tools
from alignlab.errors import ConfigError
from alignlab.online.backends import Sampled
from alignlab.online.generation import cut_at_stop, generate, hash32, matches_solution
from alignlab.online.rewards import is_async
from alignlab.online.rollout import Samples
from alignlab.online.tools import (
    ToolCall,
    import_object,
    load_tools,
    parse_tool_calls,
    resolve_tool_call_format,
    run_tool_call,
    tool_schema,
)

log = logging.getLogger(__name__)

# -- environments -------------------------------------------------------------------------------


class StepResult(NamedTuple):
    """What an environment answers to the conversation so far.

    observation: messages to append (e.g. `{"role": "tool", ...}` or `{"role": "user", ...}`); ignored when done.
    done: the episode ends here.
    reward: the episode's reward from the environment (None: none), read by the `environment_reward`
        reward function; only the last step's counts.
    tool_calls, tool_failures: calls made in this step and how many of them failed (for metrics).
    """

    observation: list[dict]
    done: bool
    reward: float | None = None
    tool_calls: int = 0
    tool_failures: int = 0


class Environment(Protocol):
    """What a multi-turn environment (`algorithm.environment`, by dotted path) defines: `reset` and `step`.
    Any class with the two is one; it need not subclass this. Checked before a model loads
    (`environment_factory`: ConfigError naming algorithm.environment when the class does not import or
    lacks either method). One instance per episode, holding its state (e.g. what reset read from the row),
    so a prompt's `num_generations` episodes have one each; its constructor gets `tools`,
    `tool_call_format` and `tool_timeout` where it takes them.

    reset(row) -> list[dict]: the episode's opening messages (chat messages, dicts with a `role` string
        and `content`; e.g. `list(row["prompt"])`) for a data row `{"prompt": messages, **its columns}`
        (`solution`, `tools`, ...). Called once per episode, before sampling; the opening messages are the
        prompt the policy sees, rendered with the tools' schemas. A prompt's episodes share one prompt
        encoding, so reset must give them the same messages: draw any randomness from the row.
    step(messages) -> StepResult, or a tuple (observation, done) / (observation, done, reward): called
        after each assistant turn that ended at a stop token (not one cut at max_completion_length), with
        the conversation so far (the opening messages, then the turns: assistant messages carry the
        sampled text as `content`). `observation` is a list of messages appended as context (never
        trained; None or [] for none; ignored when done or after the `max_turns`-th turn, and ending the
        episode when it would not fit max_completion_length); `done` ends the episode; `reward` (a float,
        or None) of the step that ends it reaches the reward function `environment_reward` (0.0 where None).

    Raises (the run stops, naming the class): TypeError when reset gives no message list or an empty one
    (`opening_messages`), or step gives neither a StepResult nor such a tuple, or an observation that is
    not a message list (`as_step_result`); ValueError when a prompt's episodes get different opening
    messages. An exception raised in reset or step is not caught: it stops the run.
    """

    def reset(self, row: dict) -> list[dict]:
        """The episode's opening messages for a data row ({"prompt": messages, **columns})."""

    def step(self, messages: list[dict]) -> StepResult | tuple:
        """The next observation for the conversation so far (opening messages + turns), or done."""


class ToolEnvironment:
    """The environment of `algorithm.tools`: each assistant turn's tool calls are run and their results
    become `tool` messages; a turn without a call ends the episode. Malformed calls and failing tools
    give error messages as results (alignlab.online.tools.run_tool_call), never an exception."""

    def __init__(self, tools: Sequence[Callable], tool_call_format: str, timeout: float | None = None):
        self.tools = {t.__name__: t for t in tools}
        self.tool_call_format, self.timeout = tool_call_format, timeout

    def reset(self, row: dict) -> list[dict]:
        return list(row["prompt"])

    def calls(self, text: str) -> list[ToolCall]:
        return parse_tool_calls(text, self.tool_call_format)

    def step(self, messages: list[dict]) -> StepResult:
        calls = self.calls(messages[-1]["content"])
        if not calls:
            return StepResult([], True)
        results = [run_tool_call(call, self.tools, self.timeout) for call in calls]
        return StepResult([r.as_message() for r in results], False, None, len(results), sum(r.failed for r in results))


def environment_factory(spec: str | None, tools: Sequence[Callable], tool_call_format: str | None, timeout):
    """A function making one environment per episode: the class at dotted path `spec` (built with
    `tools`, `tool_call_format` and `tool_timeout` where its constructor takes them), or, with spec None,
    a ToolEnvironment of `tools`.

    Raises:
        ConfigError: naming algorithm.environment when it does not import or lacks reset/step.
    """
    if spec is None:
        return lambda: ToolEnvironment(tools, tool_call_format, timeout)
    cls = import_object(spec, f"algorithm.environment {spec!r}")
    missing = [m for m in ("reset", "step") if not callable(getattr(cls, m, None))]
    if missing:
        raise ConfigError(
            f"algorithm.environment {spec!r} lacks {' and '.join(missing)} (see alignlab.online.multiturn.Environment)"
        )
    offered = {"tools": list(tools), "tool_call_format": tool_call_format, "tool_timeout": timeout}
    try:
        taken = inspect.signature(cls).parameters
    except (TypeError, ValueError):
        taken = {}
    return functools.partial(cls, **{k: v for k, v in offered.items() if k in taken})


def environment_name(environment: Any) -> str:
    """The environment's class by dotted path (as algorithm.environment names it), for error messages."""
    cls = type(environment)
    return f"{cls.__module__}.{cls.__qualname__}"


def check_messages(messages: Any, what: str) -> list[dict]:
    """`messages` as a list of chat messages: dicts with a string `role` and a `content` key.

    Raises:
        TypeError: naming `what` (e.g. `what mygame.Guess.reset(row) returns`) and showing it."""
    if isinstance(messages, (list, tuple)) and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and "content" in m for m in messages
    ):
        return list(messages)
    shown = repr(messages)
    shown = shown if len(shown) <= 200 else shown[:200] + "…"
    raise TypeError(f'{what} must be a list of messages such as [{{"role": "user", "content": "higher"}}], got {shown}')


def opening_messages(environment: Any, row: dict) -> list[dict]:
    """The episode's opening messages: `environment.reset(row)`, checked to be a non-empty message list.

    Raises:
        TypeError: naming the environment's class when reset gives no message list (check_messages)."""
    name = f"{environment_name(environment)}.reset(row)"
    opening = check_messages(environment.reset(row), f"what {name} returns")
    if not opening:
        raise TypeError(f"{name} returned no messages: the episode needs its prompt (e.g. list(row['prompt']))")
    return opening


def as_step_result(out: Any, spec: str = "the environment") -> StepResult:
    """An environment's answer as a StepResult (it may return a plain (messages, done, reward) tuple),
    its observation checked to be a message list (None: no messages).

    Raises:
        TypeError: naming the environment (`spec`) when the answer is neither, or its observation is not a
        list of messages."""
    if isinstance(out, tuple) and not isinstance(out, StepResult) and len(out) in (2, 3):
        out = StepResult(out[0], bool(out[1]), None if len(out) == 2 else out[2])
    if not isinstance(out, StepResult):
        raise TypeError(f"{spec}.step must return a StepResult or (messages, done, reward), got {type(out).__name__}")
    observation = [] if out.observation is None else out.observation
    observation = check_messages(observation, f"the observation {spec}.step returns")
    return out._replace(observation=observation)


# -- keys, rendering ------------------------------------------------------------------------------
def turn_keys(keys: torch.Tensor, turn: int) -> torch.Tensor:
    """The sampling keys of assistant turn `turn` (0: `keys` themselves, so a one-turn episode samples
    what single-turn sampling does; later turns: the keys mixed with the turn number)."""
    if turn == 0:
        return keys
    return hash32(keys ^ hash32(torch.tensor(turn * 0x27D4EB2F + 0x165667B1)))


def render_prompt(tokenizer, messages: list[dict], schemas: list[dict] | None) -> list[int]:
    """Token ids of `messages` plus the assistant generation prompt, the tools' `schemas` passed to the chat
    template's `tools` argument (a template that does not read it, like the tiny model's, ignores them).
    Encoded as training encodes prompts (alignlab.data.tokenize.encode_prompts): a message's text that
    spells a control token (`<|im_end|>`) stays text."""
    return encode_prompts(tokenizer, [messages], tools=[schemas or None])[0]


def observation_ids(tokenizer, observation: list[dict], stops: Sequence[int]) -> list[int]:
    """The ids the chat template writes for `observation` messages after an assistant turn that ended at
    one of `stops`, up to the next assistant generation prompt: what follows the end of turn in
    render([user, assistant, *observation], generation prompt) beyond render([user, assistant]). The
    assistant's own tokens are never re-rendered (TRL's `_get_tool_suffix_ids` does the same).

    Raises:
        ValueError: when the template renders the shorter conversation other than as a prefix of the longer.
    """
    assistant: dict = {"role": "assistant", "content": "."}
    if observation and observation[0].get("role") == "tool":  # templates that name the call the result answers
        assistant["tool_calls"] = [
            {"type": "function", "function": {"name": observation[0].get("name", "tool"), "arguments": {}}}
        ]
    opening = [{"role": "user", "content": "."}, assistant]
    # encoded as prompts are, so a tool result that spells a control token stays text (encode_prompts)
    before, after = encode_prompts(tokenizer, [opening, opening + list(observation)])
    ends = [i for i, t in enumerate(before) if t in set(stops)]
    before = before[: ends[-1] + 1] if ends else before
    if after[: len(before)] != before:
        raise ValueError("the chat template does not render a conversation as a prefix of its continuation")
    return after[len(before) :]


# -- the rollout ---------------------------------------------------------------------------------
@dataclass
class Episode:
    """One multi-turn episode: its prompt's ids and opening messages, and everything after the prompt."""

    prompt_ids: list[int]
    opening: list[dict]
    environment: Any
    ids: list[int] = field(default_factory=list)  # every token after the prompt
    policy: list[int] = field(default_factory=list)  # 1 where the policy sampled the token, 0 for observations
    messages: list[dict] = field(default_factory=list)  # the turns after the opening messages
    turns: int = 0  # assistant turns
    tool_calls: int = 0
    tool_failures: int = 0
    truncated: bool = False  # the last turn was cut at max_completion_length
    hit_max_turns: bool = False  # the environment would have gone on after the last allowed turn
    reward: float | None = None
    done: bool = False
    # An engine's (vLLM's) log-prob of each token after the prompt at sampling time, 0.0 on observations;
    # None when the policy sampled in this process (alignlab.online.backends.Sampled)
    sampling_logps: list[float] | None = None

    @property
    def final_answer(self) -> str:
        """The last assistant turn's text."""
        return next((m["content"] for m in reversed(self.messages) if m["role"] == "assistant"), "")


# sampler(context ids [B, L] left-padded, attention mask, num_per_prompt, max_new_tokens, keys or None)
# -> [B·num_per_prompt, ≤ max_new_tokens] tokens, or an engine's Sampled (tokens and their log-probs):
# the backend's `sample` contract
Sampler = Callable[[torch.Tensor, torch.Tensor, int, int, "torch.Tensor | None"], "torch.Tensor | Sampled"]


class EpisodeSetup(NamedTuple):
    """What every episode of a run shares: the tools, their JSON schemas (the chat template's `tools`
    argument), the factory of one environment per episode, and whether that environment is the user's
    (`algorithm.environment`, which decides what a row's own `tools` mean) rather than the tools'."""

    tools: list[Callable]
    schemas: list[dict]
    new_environment: Callable[[], Any]
    own_environment: bool = False


def schema_name(schema: Any) -> str | None:
    """The tool name a JSON schema gives (`{"type": "function", "function": {"name": …}}` or `{"name": …}`)."""
    if not isinstance(schema, dict):
        return None
    body = schema.get("function", schema)
    return body.get("name") if isinstance(body, dict) and isinstance(body.get("name"), str) else None


def episode_schemas(setup: EpisodeSetup, row_tools: Any, where: str = "a row") -> list[dict]:
    """The schemas an episode's prompt shows: `algorithm.tools`' schemas, then the row's own `tools`
    column's that name another tool (a row schema named as an algorithm tool is left out: the schema made
    from the function that runs is shown).

    Raises:
        ConfigError: when the row offers a tool that nothing would run: with `algorithm.tools` and no
            `algorithm.environment`, only `algorithm.tools` run, so a row schema naming another tool would
            invite calls that can only fail. Names the row (`where`) and the tool.
    """
    if not row_tools:
        return setup.schemas
    known = {schema_name(s) for s in setup.schemas}
    extra = [s for s in row_tools if schema_name(s) not in known]
    if extra and not setup.own_environment:
        names = [schema_name(s) for s in extra]
        raise ConfigError(
            f"{where} offers the tools {names} in its `tools` column, but only algorithm.tools "
            f"({sorted(n for n in known if n)}) run in an episode: add them to algorithm.tools (by dotted path), "
            "drop them from the row, or give an algorithm.environment that runs them (docs/tools.md#a-rows-own-tools)"
        )
    return [*setup.schemas, *extra]


def check_row_tools(
    setup: EpisodeSetup, rows: Sequence[dict], describe: str = "data", origin: Callable | None = None
) -> None:
    """`episode_schemas` on every row, before anything is written. `origin(row)`: (file, row number, field)
    of a row (a FileSource's `origin`), which the error names; None, or a row it does not know: the row's
    place in `rows` (from 1) after `describe`.

    Raises:
        ConfigError: naming the first row that offers a tool nothing would run."""
    for i, row in enumerate(rows):
        if row.get("tools"):
            found = origin(row) if origin is not None else None
            where = f"{found[0]}, row {found[1]}," if found else f"{describe}, row {i + 1},"
            episode_schemas(setup, row["tools"], where)


def episode_setup(
    tools: Sequence[str] | None, tool_call_format: str | None, tool_timeout, environment: str | None, tokenizer
) -> EpisodeSetup:
    """The tools at dotted paths `tools` loaded, the call format resolved (`tool_call_format`, else the
    one the tokenizer's chat template writes) and the environment factory (algorithm.environment, else the
    tools'), whose `tool` messages the template must be able to write.

    Raises:
        ConfigError: naming the algorithm key (a tool or environment that does not load, no call format, a
            template that refuses `tool` messages).
    """
    functions = load_tools(list(tools or []))
    call_format = tool_call_format
    if functions:
        call_format = resolve_tool_call_format(tool_call_format, tokenizer.chat_template)
        if environment is None:
            check_tool_messages(tokenizer)
    schemas = [tool_schema(t) for t in functions]
    if schemas and not template_writes_tools(tokenizer)[0]:
        log.warning(
            "algorithm.tools: the model's chat template does not write tool schemas, so the prompts never show "
            "them; the model calls tools only as it learnt to (SFT on tool-call traces, docs/tools.md), or set "
            "model.chat_template to a template with tools support"
        )
    factory = environment_factory(environment, functions, call_format, tool_timeout)
    return EpisodeSetup(functions, schemas, factory, environment is not None)


def check_tool_messages(tokenizer) -> None:
    """Whether the chat template writes a `tool` message's content after an assistant turn (Gemma's and
    Mistral's refuse any role but user and assistant; Phi-3's leaves it out, so the model would never see
    a result), found out before any episode runs.

    Raises:
        ConfigError: naming algorithm.tools, with the template's own reason.
    """
    from alignlab.data.tokenize import end_of_turn_ids

    probe = "tool result 4096"
    try:
        message = {"role": "tool", "name": "tool", "content": probe}
        ids = observation_ids(tokenizer, [message], end_of_turn_ids(tokenizer))
        reason = None if probe in tokenizer.decode(ids) else "it leaves tool messages out"  # Phi-3's drops them
    except ValueError as e:  # TemplateRefusal, or a template that does not extend the conversation
        reason = getattr(e, "reason", str(e))
    if reason is not None:
        raise ConfigError(
            f"algorithm.tools: the model's chat template cannot write a tool result ({reason}). Use a model "
            "whose template supports tools (Qwen2.5, Qwen3, Llama-3.x, ...), set model.chat_template to one "
            "that does, or give an algorithm.environment that replies in roles the template takes (user)"
        ) from None


def open_episodes(
    prompts: list[list[dict]], columns: dict[str, list], num_per_prompt: int, setup: EpisodeSetup, tokenizer
) -> list[Episode]:
    """`num_per_prompt` fresh episodes per prompt (consecutive), each with its own environment, reset with
    the row ({"prompt": messages, **its columns}); a group's prompt is what its first environment's reset
    gives, rendered with the tools' schemas.

    Raises:
        TypeError: naming the environment when its reset gives no message list (opening_messages).
        ValueError: naming the environment and the row's prompt when the group's resets differ (its episodes
        share one prompt encoding)."""
    episodes = []
    for i, messages in enumerate(prompts):
        row = {"prompt": messages, **{k: v[i] for k, v in columns.items()}}
        environments = [setup.new_environment() for _ in range(num_per_prompt)]
        opening = opening_messages(environments[0], row)
        if any(opening_messages(other, row) != opening for other in environments[1:]):
            raise ValueError(
                f"{environment_name(environments[0])}.reset gave different opening messages to the episodes of "
                f"the row whose prompt is {_shown(messages)}: a prompt's "
                "num_generations episodes share one prompt encoding, so reset must give the same messages for "
                "the same row (draw any randomness from the row, e.g. a seed column)"
            )
        schemas = episode_schemas(setup, row.get("tools"), f"the row whose prompt is {_shown(messages)}")
        ids = render_prompt(tokenizer, opening, schemas)
        episodes += [Episode(ids, list(opening), env) for env in environments]
    return episodes


def _shown(messages: list[dict]) -> str:
    shown = repr(messages)
    return shown if len(shown) <= 120 else shown[:120] + "…"


def greedy_sampler(model, tokenizer, stops: Sequence[int]) -> Sampler:
    """A Sampler that decodes greedily (held-out evaluation); it takes no keys."""

    def sampler(ids, attn, n, max_new, _keys):
        return generate(model, tokenizer, ids, attn, max_new, stop_ids=stops)

    return sampler


def run_episodes(
    sampler: Sampler,
    tokenizer,
    episodes: list[Episode],
    num_per_prompt: int,
    max_turns: int,
    max_completion_length: int,
    stops: Sequence[int],
    chunk: int,
    keys: torch.Tensor | None,
    device: torch.device | str = "cpu",
) -> list[Episode]:
    """Run `episodes` (consecutive groups of `num_per_prompt` sharing a prompt) to their ends.

    Turn 0 samples each group's prompt once for its `num_per_prompt` episodes (the backend shares the
    prompt's KV cache); later turns sample each live episode's whole context. Each turn gets at most
    what is left of `max_completion_length`; an observation that would not leave room for one more token
    ends the episode before it is appended (TRL drops such tool results too). `keys` ([len(episodes)],
    or None for greedy samplers) are mixed with the turn (turn_keys). A sampler that returns Sampled
    (an engine) leaves each episode its log-probs (Episode.sampling_logps). Returns the episodes, finished.
    """
    stop_set = set(stops)
    for turn in range(max_turns):
        live = [i for i, e in enumerate(episodes) if not e.done]
        if not live:
            break
        keyed = None if keys is None else turn_keys(keys, turn)
        group = num_per_prompt if turn == 0 else 1
        heads = live[::group]  # turn 0: every episode is live, groups are consecutive
        tokens, logps = sample_turn(
            sampler, tokenizer, episodes, heads, group, max_completion_length, stops, chunk, keyed, device
        )
        for i in live:
            step_turn(
                episodes[i], tokens[i], tokenizer, stop_set, stops, turn, max_turns, max_completion_length, logps[i]
            )
    return episodes


def sample_turn(
    sampler: Sampler,
    tokenizer,
    episodes: list[Episode],
    heads: list[int],
    group: int,
    max_completion_length: int,
    stops: Sequence[int],
    chunk: int,
    keys: torch.Tensor | None,
    device: torch.device | str,
) -> tuple[dict[int, list[int]], dict[int, list[float] | None]]:
    """One turn's answers, at most `chunk` at a time: `group` answers to the context of each episode in
    `heads` (its prompt and what it holds so far), for it and the `group` − 1 episodes after it; each
    gets at most what is left of `max_completion_length`. Returns ({episode: its answer's token ids,
    through the stop token}, {episode: an engine's log-probs of them, or None}); `keys`: this turn's
    (turn_keys) for every episode, or None."""
    tokens: dict[int, list[int]] = {}
    logps: dict[int, list[float] | None] = {}
    per_call = max(1, chunk // group)
    for start in range(0, len(heads), per_call):
        rows = heads[start : start + per_call]
        contexts = [episodes[i].prompt_ids + episodes[i].ids for i in rows]
        ids, attn = pad(contexts, tokenizer.pad_token_id, left=True)
        budget = max(max_completion_length - len(episodes[i].ids) for i in rows)
        members = [i + j for i in rows for j in range(group)]
        out = sampler(ids.to(device), attn.to(device), group, budget, None if keys is None else keys[members])
        engine = out.logprobs if isinstance(out, Sampled) else None
        answers, _ = cut_at_stop(out.tokens if engine is not None else out, stops)
        tokens.update(zip(members, answers))
        for row, (i, answer) in enumerate(zip(members, answers)):
            logps[i] = None if engine is None else engine[row, : len(answer)].tolist()
    return tokens, logps


def step_turn(
    episode: Episode,
    sampled: list[int],
    tokenizer,
    stop_set: set[int],
    stops: Sequence[int],
    turn: int,
    max_turns: int,
    max_completion_length: int,
    logps: list[float] | None = None,
) -> None:
    """Append one sampled assistant turn to `episode` (with an engine's log-probs of its tokens, `logps`)
    and, unless it ends there, the environment's reply."""
    sampled = sampled[: max_completion_length - len(episode.ids)]
    ended = bool(sampled) and sampled[-1] in stop_set
    if logps is not None:
        episode.sampling_logps = (episode.sampling_logps or []) + logps[: len(sampled)]
    episode.ids += sampled
    episode.policy += [1] * len(sampled)
    episode.turns += 1
    text = tokenizer.decode(sampled[:-1] if ended else sampled, skip_special_tokens=True)
    episode.messages.append({"role": "assistant", "content": text})
    if not ended:  # cut at the length limit: nothing to act on
        episode.truncated = episode.done = True
        return
    environment = episode.environment
    result = as_step_result(environment.step(episode.opening + episode.messages), environment_name(environment))
    episode.tool_calls += result.tool_calls
    episode.tool_failures += result.tool_failures
    if result.done:
        episode.reward, episode.done = result.reward, True
        return
    if turn == max_turns - 1:
        episode.hit_max_turns = episode.done = True
        return
    context = observation_ids(tokenizer, result.observation, stops)
    if len(episode.ids) + len(context) >= max_completion_length:
        episode.done = True
        return
    episode.ids += context
    episode.policy += [0] * len(context)
    if episode.sampling_logps is not None:
        episode.sampling_logps += [0.0] * len(context)  # context, masked: no engine log-prob
    episode.messages += result.observation


def episode_samples(episodes: list[Episode], pad_id: int, device: torch.device | str) -> Samples:
    """The episodes as Samples: prompt + everything after it, right-padded, with `mask` 1 on the policy's
    tokens only (observations are context), `has_eos` where the last turn ended at a stop token, and an
    engine's log-probs (`sampling_logprobs`, 0 on observations and padding) when it sampled every turn."""
    prompts, responses = [e.prompt_ids for e in episodes], [e.ids for e in episodes]
    seqs = {k: v.to(device) for k, v in collate_answers(prompts, responses, pad_id).items()}
    width = max(1, max(len(r) for r in responses))
    mask = torch.zeros(len(episodes), width, device=device)
    for i, e in enumerate(episodes):
        mask[i, : len(e.policy)] = torch.tensor(e.policy, dtype=mask.dtype)
    starts = torch.tensor([len(p) for p in prompts], device=device)
    has_eos = torch.tensor([not e.truncated for e in episodes], device=device)
    logps = None
    if episodes and all(e.sampling_logps is not None for e in episodes):
        logps = torch.zeros(mask.shape, dtype=torch.float32, device=device)
        for i, e in enumerate(episodes):
            logps[i, : len(e.sampling_logps)] = torch.tensor(e.sampling_logps, dtype=torch.float32)
    return Samples(seqs, starts, mask, has_eos, prompts, responses, logps)


def episode_metrics(episodes: list[Episode], max_turns: int) -> dict[str, float]:
    """Means over the episodes: `num_turns` (assistant turns), `tools/call_frequency` (calls per episode,
    TRL's name), `tools/failure_frequency` (the share of calls that failed, TRL's name; 0 without calls),
    `max_turns_ratio` (the share of episodes that hit max_turns while the environment would have gone on)."""
    n = max(1, len(episodes))
    calls = sum(e.tool_calls for e in episodes)
    return {
        "num_turns": sum(e.turns for e in episodes) / n,
        "tools/call_frequency": calls / n,
        "tools/failure_frequency": sum(e.tool_failures for e in episodes) / calls if calls else 0.0,
        "max_turns_ratio": sum(e.hit_max_turns for e in episodes) / n,
    }


def conversation(episode: Episode) -> list[dict]:
    """What reward functions get as a multi-turn completion: the turns after the opening messages."""
    return list(episode.messages)


def on_final_answers(fn: Callable) -> Callable:
    """A text reward function (the registry's: accuracy, format, ...) made to read a multi-turn
    completion (a message list) as its last assistant turn's text; text completions pass unchanged."""

    def final(c):
        if isinstance(c, list):
            return next((m["content"] for m in reversed(c) if m.get("role") == "assistant"), "")
        return c

    if is_async(fn):

        async def reading_final_async(prompts, completions, **columns):
            return await fn(prompts, [final(c) for c in completions], **columns)

        return functools.update_wrapper(reading_final_async, fn, updated=())

    def reading_final(prompts, completions, **columns):
        return fn(prompts, [final(c) for c in completions], **columns)

    if inspect.isfunction(fn):
        return functools.update_wrapper(reading_final, fn, updated=())
    reading_final.__wrapped__ = fn  # a callable object (cosine): what it requires (required_columns) and takes
    return reading_final


def environment_reward(prompts, completions, environment_reward=None, **columns) -> list[float]:
    """The reward each episode's environment gave at its end (StepResult.reward; 0.0 where it gave none)."""
    if environment_reward is None:
        raise ValueError("environment_reward needs a multi-turn run (algorithm.tools or algorithm.environment)")
    return [0.0 if r is None else float(r) for r in environment_reward]


def tool_result_matches(prompts, completions, solution=None, **columns) -> list[float]:
    """1.0 where a tool's result in the conversation is the row's `solution` (the same text or number,
    alignlab.online.generation.matches_solution), else 0.0: whether the policy called a tool with arguments that
    give the right answer, whatever it made of the result. With a reward weight of 0 it only measures."""
    if solution is None:
        raise ValueError("tool_result_matches needs a `solution` column")
    return [
        float(any(m.get("role") == "tool" and matches_solution(str(m["content"]), s) for m in c))
        for c, s in zip(completions, solution)
    ]


tool_result_matches.required_columns = ("solution",)
