"""Turning canonical rows into token ids through the model's own chat template.

How a row becomes ids (the same for every data kind, in training, evaluation and the prompts PPO and
GRPO sample from):

1. The template renders the prompt messages plus the assistant answer with every message content
   replaced by a unique placeholder. The text between placeholders is the template's markup, so no
   assumption about the family is made: Llama-3 headers, ChatML, `[INST]`, Gemma turns, Qwen3's empty
   think block all come from the template.
2. Markup is encoded with its special tokens as those tokens; message contents are encoded as text only,
   so a message that spells `<|im_end|>`, `</s>` or the pad token gets the ids of those characters, never
   the control token (a copy of the fast tokenizer with special-token matching off, in which the
   markup's special tokens are stand-in strings mapped back to their ids: one encoder call per text, so
   pieces are cut exactly as the tokenizer cuts the rendered text).
3. Prompt ids are everything before the answer's content (taken from the full rendering, so they are a
   prefix of prompt + answer even for templates whose generation prompt differs, e.g. Qwen3, whose
   assistant turn carries an empty think block that its thinking-on generation prompt lacks). Answer
   ids are the content followed by the template's end of turn: what it writes right after an assistant
   message up to and including the first special token there (`<|eot_id|>`, `<end_of_turn>`,
   `<|im_end|>`, `</s>`, `<|end|>`). The newline many templates write after that token is not trained:
   generation stops at the end-of-turn token, so the model never writes it. A template that writes no
   special token there ends the answer with its text (right whitespace dropped) and eos.
   Text a template writes from the row's tool schemas (names, descriptions) is markup, not a message
   content; a special token's text in it is broken up before rendering (`_Codec.defuse`) and encoded
   as text too.
4. A content the template trims (Llama-3, Gemma) is encoded as the template writes it; so is an earlier
   assistant turn the template rewrites (Qwen3 drops the think block of a turn before the last user
   message). Any other rewrite by the template (e.g. Qwen3 moving `<think>…</think>` out of the answer
   into its markup) is not followed: the content is encoded as written.
The prompt and the answer are encoded as two texts, so the answer's ids are those the model generates
after the prompt; they equal the ids of the whole rendered conversation unless the tokenizer would
merge the prompt's last characters with the answer's first ones.
"""

from __future__ import annotations

import json
import re
import secrets
import weakref
from collections.abc import Sequence

from alignlab.data.vision import IMAGE_PLACEHOLDER

SYSTEM_PROMPT = ("keep", "merge")  # data.system_prompt: pass system messages to the template, or fold them in

# Placeholders and stand-ins carry a random mark, so no text a user writes can be mistaken for them.
_MARK = secrets.token_hex(8)
_BREAK = f"\ue006{_MARK}\ue007"  # breaks a special token's text in tool schemas (see _Codec.defuse)
_PLACEHOLDER = re.compile("\ue000" + _MARK + r":(\d+)\ue001")


def _placeholder(i: int) -> str:
    return f"\ue000{_MARK}:{i}\ue001"


class TemplateRefusal(ValueError):
    """The chat template raised on a conversation. `index` is its position in the batch, `reason` the
    template's own message (e.g. Gemma's "System role not supported")."""

    def __init__(self, index: int, reason: str):
        super().__init__(f"row {index}: {reason}")
        self.index, self.reason = index, reason


def merge_system(messages: list[dict]) -> list[dict]:
    """data.system_prompt=merge: each system message's text is put before the next user message's
    (separated by a blank line), for templates that refuse a system role (Gemma, Mistral v0.1). An empty
    system message is dropped; a system message with no user message after it is kept."""
    last_user = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=-1)
    out, pending = [], []
    for i, m in enumerate(messages):
        if m["role"] == "system" and i < last_user:
            if m["content"]:
                pending.append(m["content"])
        elif m["role"] == "user" and pending:
            out.append({**m, "content": "\n\n".join([*pending, m["content"]])})
            pending = []
        else:
            out.append(m)
    return out


class _Codec:
    """Encodes template text in which special tokens are written as stand-ins (markup) and every other
    character is text (content), with one call of a copy of the fast tokenizer per text."""

    def __init__(self, tokenizer):
        from tokenizers import AddedToken, Tokenizer

        specials = {i: t for i, t in tokenizer.added_tokens_decoder.items() if t.special}
        self.fast = bool(getattr(tokenizer, "is_fast", False)) and hasattr(tokenizer, "backend_tokenizer")
        self.tokenizer = tokenizer
        self.stand_in = {t.content: f"\ue002{_MARK}:{i}\ue003" for i, t in specials.items()}
        self.special_id = {self.stand_in[t.content]: i for i, t in specials.items()}
        by_length = sorted(self.stand_in, key=len, reverse=True)  # the longest match wins, as in the tokenizer
        self.pattern = re.compile("|".join(map(re.escape, by_length))) if by_length else None
        self.takes_right_space = {self.stand_in[t.content] for t in specials.values() if t.rstrip}
        self.boundary = f"\ue004{_MARK}\ue005"  # starts a text mid-conversation (see encode)
        # Splits a special token's text written inside tool schemas, so `protect` does not take it for markup;
        # dropped once protected (also as a template's `tojson(ensure_ascii=True)` writes it).
        self.breaks = (_BREAK, json.dumps(_BREAK)[1:-1])
        if not self.fast:
            return
        backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
        backend.no_truncation()
        backend.no_padding()
        backend.encode_special_tokens = True  # content never becomes a special token
        backend.add_tokens(
            [
                AddedToken(self.stand_in[t.content], special=False, normalized=False, lstrip=t.lstrip, rstrip=t.rstrip)
                for t in specials.values()
            ]
            + [AddedToken(self.boundary, special=False, normalized=False)]
        )
        self.backend = backend
        self.to_real = {backend.token_to_id(s): i for s, i in self.special_id.items()}

    def protect(self, markup: str) -> str:
        """Markup with each special token written as its stand-in (text `defuse` broke up stays text)."""
        out = self.pattern.sub(lambda m: self.stand_in[m.group(0)], markup) if self.pattern else markup
        for mark in self.breaks:
            out = out.replace(mark, "")
        return out

    def defuse(self, value):
        """`value` (tool schemas: dicts, lists, text) with every special token's text in its strings broken
        by `_BREAK`, so that what a template writes from it stays text (`protect` drops the breaks)."""
        if isinstance(value, str):
            return self.pattern.sub(lambda m: m.group(0)[0] + _BREAK + m.group(0)[1:], value) if self.pattern else value
        if isinstance(value, dict):
            return {self.defuse(k): self.defuse(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [self.defuse(v) for v in value]
        return value

    def encode(self, texts: list[str], after: list[str] | None = None) -> list[list[int]]:
        """Ids of protected texts. `after`: per text, the protected text it follows in the conversation
        (None: the text starts the input). A text is encoded behind the stand-in that ends what it
        follows (or a neutral one), whose id is then dropped: so it is cut as in the whole conversation
        (no prefix space mid-input; a special token that takes the whitespace to its right takes it)."""
        if not self.fast:
            return [self._encode_slow(t) for t in texts]
        heads = [self._head(a) if a is not None else "" for a in after] if after is not None else [""] * len(texts)
        encodings = self.backend.encode_batch([h + t for h, t in zip(heads, texts)], add_special_tokens=False)
        return [[self.to_real.get(i, i) for i in e.ids[1 if h else 0 :]] for h, e in zip(heads, encodings)]

    def _head(self, before: str) -> str:
        """What a text following `before` is encoded behind: the special token `before` ends with, with
        the whitespace after it when that token takes the whitespace to its right; else a neutral one."""
        stripped = before.rstrip()
        last = next((s for s in self.special_id if stripped.endswith(s)), None)
        if last is not None and (stripped == before or last in self.takes_right_space):
            return before[len(stripped) - len(last) :]
        return self.boundary

    def _encode_slow(self, text: str) -> list[int]:
        """A tokenizer without a `tokenizers` backend: text between special tokens, one piece at a time."""
        ids, start = [], 0
        stand_ins = re.compile("|".join(map(re.escape, self.special_id))) if self.special_id else None
        for m in stand_ins.finditer(text) if stand_ins else ():
            if m.start() > start:
                ids += self._text_ids(text[start : m.start()])
            ids.append(self.special_id[m.group(0)])
            start = m.end()
        return ids + (self._text_ids(text[start:]) if start < len(text) else [])

    def _text_ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]


_CODECS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_END_OF_TURN: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _codec(tokenizer) -> _Codec:
    key = (len(tokenizer), tuple(tokenizer.added_tokens_decoder))
    cached = _CODECS.get(tokenizer)
    if cached is None or cached[0] != key:
        cached = _CODECS[tokenizer] = (key, _Codec(tokenizer))
    return cached[1]


def _render(tokenizer, messages: list[dict], index: int, tools: list[dict] | None = None) -> str:
    from jinja2.exceptions import TemplateError

    extra = {"tools": tools} if tools else {}  # the row's tool schemas, for the template to write
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False, **extra)
    except TemplateError as e:  # raise_exception(...) in the template, an undefined variable, ...
        raise TemplateRefusal(index, str(e)) from None
    except (TypeError, ValueError, KeyError, IndexError) as e:
        if not tokenizer.chat_template:
            raise
        raise TemplateRefusal(index, f"{type(e).__name__}: {e}") from None


def hermes_calls(message: dict) -> str:
    """An assistant message's text with its tool calls written after it as Hermes blocks (Qwen2.5's
    layout: `<tool_call>\n{"name": …, "arguments": {…}}\n</tool_call>`, one per call, a newline between),
    what `alignlab.online.tools.parse_hermes` reads back: the calls of a template that writes none."""
    blocks = [
        "<tool_call>\n"
        + json.dumps({"name": c["function"]["name"], "arguments": c["function"]["arguments"]})
        + "\n</tool_call>"
        for c in message["tool_calls"]
    ]
    return "\n".join([message["content"], *blocks] if message["content"] else blocks)


def _call_text(tokenizer, codec: _Codec, context: list[dict], message: dict, index: int, tools) -> str:
    """The text the chat template writes for assistant `message`, which calls tools, after `context`: what
    stands where a plain assistant message's content would (its content and the calls in the template's
    format, protected: a marker such as Mistral's `[TOOL_CALLS]` is its special token, while text from the
    message stays text). A template that writes no calls gets them as Hermes blocks (`hermes_calls`).

    Raises:
        TemplateRefusal: the template raises, or writes the turn with other markup around it than a plain one.
    """
    probe = _render(tokenizer, [*context, {"role": "assistant", "content": _placeholder(0)}], index, tools)
    real = _render(tokenizer, [*context, codec.defuse(message)], index, tools)
    start = probe.find(_placeholder(0))
    before, after = probe[:start], probe[start + len(_placeholder(0)) :]
    if not (real.startswith(before) and real.endswith(after) and len(real) >= len(before) + len(after)):
        raise TemplateRefusal(
            index,
            "the chat template writes a tool-calling assistant turn inside other markup than a plain turn (Mistral "
            "v0.3 drops the space it writes before a plain answer), so its calls cannot be trained as it lays them "
            "out; set model.chat_template to a template that writes calls where it writes an answer (Qwen2.5's)",
        )
    body = real[len(before) : len(real) - len(after)]
    if body.strip() == codec.defuse(message["content"]).strip():  # the calls left out: the template writes none
        return hermes_calls(message)
    return codec.protect(body)


def _with_calls(tokenizer, codec: _Codec, messages: list[dict], answers: list, index: int, tools):
    """`messages` and `answers` with every assistant message that calls tools (a dict answer is one) made
    a plain assistant message whose content is the text the template writes for it (`_call_text`), so
    the calls are laid out, and trained, as any assistant content is (a per-turn `loss` stays with it); `name`
    and the other keys of tool results stay for the template."""
    if not any(m.get("tool_calls") for m in messages) and all(isinstance(a, str) for a in answers):
        return messages, answers
    out = []
    for m in messages:
        if m["role"] == "assistant" and m.get("tool_calls"):
            text = _call_text(tokenizer, codec, messages[: len(out)], m, index, tools)
            m = {
                "role": "assistant",
                "content": text,
                **({"loss": m["loss"]} if "loss" in m else {}),
            }  # ms-swift's flag
        out.append(m)
    flat = [a if isinstance(a, str) else _call_text(tokenizer, codec, messages, a, index, tools) for a in answers]
    return out, flat


_WRITES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def template_writes_tools(tokenizer) -> tuple[bool, bool]:
    """(whether the chat template writes the schemas it gets as `tools`, whether it writes an assistant
    message's `tool_calls`), found by rendering a probe conversation with and without them (False, False
    without a template). A template that writes no calls gets them as Hermes text (`hermes_calls`); one
    that writes no schemas leaves the model without them. Cached per tokenizer and template."""
    key = tokenizer.chat_template
    cached = _WRITES.get(tokenizer)
    if cached is not None and cached[0] == key:
        return cached[1]
    name = f"probe_{_MARK}"
    schema = {"type": "function", "function": {"name": name, "description": name, "parameters": {"type": "object"}}}
    call = {"type": "function", "id": "a1b2c3d4e", "function": {"name": name, "arguments": {name: 1}}}
    user = {"role": "user", "content": "."}
    answer = {"role": "assistant", "content": "."}
    result = (False, False)
    if tokenizer.chat_template:
        try:
            schemas = name in _render(tokenizer, [user, answer], 0, [schema])
        except TemplateRefusal:
            schemas = False
        try:
            calls = name in _render(tokenizer, [user, {**answer, "tool_calls": [call]}], 0)
        except TemplateRefusal:
            calls = False
        result = (schemas, calls)
    _WRITES[tokenizer] = (key, result)
    return result


def _end_of_turn(codec: _Codec, tail: str, eos: str | None) -> str:
    """The protected text that ends an answer: the template's text after the answer up to and including
    its first special token; without one, that text without right whitespace, then eos."""
    protected = codec.protect(tail)
    first = min((protected.find(s) for s in codec.special_id if s in protected), default=-1)
    if first >= 0:
        stand_in = next(s for s in codec.special_id if protected.startswith(s, first))
        return protected[: first + len(stand_in)]
    return protected.rstrip() + (codec.protect(eos) if eos else "")


def _as_written(
    pieces: list[str], contents: list[str], rendered: str, free: frozenset[int] = frozenset()
) -> list[str] | None:
    """The contents as the template wrote them in `rendered` (trimmed, if it trims), given the markup
    `pieces` around them (len(contents) + 1 pieces); None when `rendered` is not that markup with each
    content, or a trimmed form of it, in its place. A content whose position is in `free` (an earlier
    assistant turn) may be any text the template wrote between its markup (e.g. Qwen3 drops the think
    block of an assistant turn before the last user message)."""
    out, pos = [], 0
    for j, (markup, content, after) in enumerate(zip(pieces, contents, pieces[1:])):
        if not rendered.startswith(markup, pos):
            return None
        pos += len(markup)
        forms = (content, content.strip(), content.lstrip(), content.rstrip(), content.strip("\n"))
        form = next((f for f in forms if rendered.startswith(f + after, pos)), None)
        if form is None and j in free and after and (end := rendered.find(after, pos)) > pos:
            form = rendered[pos:end]
        if form is None:
            return None
        out.append(form)
        pos += len(form)
    return out if rendered[pos:] == pieces[-1] else None


def _lay_out(
    tokenizer, messages: list[dict], index: int, tools: list[dict] | None = None
) -> tuple[list[str], list[int]]:
    """The template's markup around the contents of `messages` + an assistant answer: (markup pieces,
    which message's content follows each piece but the last); the answer (index len(messages)) is the
    last content, written once. The template may leave a message out or write one twice."""
    n = len(messages)
    masked = [{**m, "content": _placeholder(i)} for i, m in enumerate(messages)]
    layout = _render(tokenizer, [*masked, {"role": "assistant", "content": _placeholder(n)}], index, tools)
    found = list(_PLACEHOLDER.finditer(layout))
    order = [int(m.group(1)) for m in found]
    if not order or order[-1] != n or order.count(n) != 1:
        raise TemplateRefusal(index, "the chat template does not write the assistant answer last")
    starts, ends = [0] + [m.end() for m in found], [m.start() for m in found] + [len(layout)]
    return [layout[a:b] for a, b in zip(starts, ends)], order


def _place_images(contents: list[str], markups: list[str], codec: _Codec, index: int) -> list[str]:
    """Prompt contents with each `<image>` replaced, in order, by its image's markup as special tokens."""
    queue, out = iter(markups), []
    for content in contents:
        pieces = content.split(IMAGE_PLACEHOLDER)
        text = pieces[0]
        for piece in pieces[1:]:
            markup = next(queue, None)
            if markup is None:
                raise TemplateRefusal(index, f"more {IMAGE_PLACEHOLDER} in the prompt than its {len(markups)} images")
            text += codec.protect(markup) + piece
        out.append(text)
    if next(queue, None) is not None:
        raise TemplateRefusal(index, f"fewer {IMAGE_PLACEHOLDER} in the prompt than its {len(markups)} images")
    return out


def encode_conversations(
    tokenizer,
    prompts: Sequence[list[dict]],
    answers: Sequence[Sequence[str]] | None = None,
    system_prompt="keep",
    images: Sequence[list[str] | None] | None = None,
    tools: Sequence[list[dict] | None] | None = None,
) -> list[tuple[list[int], list[list[int]]]]:
    """Per row, (prompt ids, [ids of each answer]) as the chat template lays the conversation out (see the
    module docstring). `answers[i]` are row i's alternative answers to the same prompt (SFT: one;
    pairwise: chosen and rejected); None: prompts only (the ids PPO/GRPO sample after). `images[i]`: the
    markup of each of row i's images (alignlab.data.vision.ImageEncoder), which replaces the `<image>`
    placeholders of its prompt in order, its special tokens as those tokens; None: a text row.
    `tools[i]`: row i's tool schemas, passed to the template's `tools` argument; None: none.

    Raises:
        TemplateRefusal: the template raised on row `index` (e.g. a system role it does not support).
    """
    encoded = _encode(tokenizer, prompts, answers, system_prompt, images, tools, turns=False)
    return [(p, a) for p, _, a in encoded]


def encode_turns(
    tokenizer,
    prompts: Sequence[list[dict]],
    answers: Sequence[Sequence[str]],
    system_prompt="keep",
    images: Sequence[list[str] | None] | None = None,
    tools: Sequence[list[dict] | None] | None = None,
    default: bool = True,
) -> list[tuple[list[int], list[int] | None, list[list[int]]]]:
    """As `encode_conversations`, with per row the trained positions of its prompt: (prompt ids, a 0/1
    mask as long as the prompt ids, 1 on the tokens of its trained earlier assistant turns, or None when
    it has none, [ids of each answer]). An assistant message's own `loss` (true or false, ms-swift's
    per-message flag) says whether it is trained; one without it is trained when `default` is true
    (data.train_on=all_assistant).

    An earlier assistant turn's tokens are found from the template's own layout of the whole
    conversation (the markup around each message is what it renders there, so a template that writes
    earlier turns differently, e.g. Qwen3 without the think block it gives the last turn, is followed):
    its content as the template wrote it, then the markup after it up to and including the first
    special token there (its end of turn; none when the template writes no special token there). Each
    trained stretch, and each stretch between them, is encoded as what follows the text before it (as
    the answer is), so its ids are those the model writes after that prefix. A prompt without
    assistant turns is encoded exactly as `encode_conversations` encodes it.
    """
    return _encode(tokenizer, prompts, answers, system_prompt, images, tools, turns=True, default=default)


def _turn_end(codec: _Codec, markup: str) -> str:
    """The start of protected `markup` after an assistant message that ends its turn: up to and including
    the first special token; "" when there is none."""
    first = min((markup.find(s) for s in codec.special_id if s in markup), default=-1)
    if first < 0:
        return ""
    return markup[: first + len(next(s for s in codec.special_id if markup.startswith(s, first)))]


def _segments(codec: _Codec, pieces: list[str], contents: list[str], trained: set[int]) -> list[tuple[str, bool]]:
    """The protected prompt text as (text, trained) stretches: `pieces` around `contents`, with the
    contents at the positions in `trained` (earlier assistant turns) and their ends of turn trained."""
    parts = []
    for j, content in enumerate(contents):
        parts += [[codec.protect(pieces[j]), False], [content, j in trained]]
    parts.append([codec.protect(pieces[len(contents)]), False])
    for k in range(len(parts) - 1):
        if parts[k][1] and not parts[k + 1][1]:  # a trained content: its end of turn opens the markup after it
            end = _turn_end(codec, parts[k + 1][0])
            parts[k][0] += end
            parts[k + 1][0] = parts[k + 1][0][len(end) :]
    out: list[tuple[str, bool]] = []
    for text, flag in parts:
        if out and out[-1][1] == flag:
            out[-1] = (out[-1][0] + text, flag)
        elif text:
            out.append((text, flag))
    return out


def _encode(tokenizer, prompts, answers, system_prompt, images, tools, turns: bool, default: bool = True) -> list:
    """The work of `encode_conversations` (turns=False) and `encode_turns` (turns=True): each row's texts
    as the template lays them out (`_row_texts`), then all rows' ids, encoded in batches (`_prompt_ids`)."""
    codec = _codec(tokenizer)
    merge = system_prompt == "merge"
    eos = tokenizer.eos_token
    prompt_texts, answer_texts, answer_after, shape = [], [], [], []
    segments: dict[int, list[tuple[str, bool]]] = {}  # row → its prompt's stretches, for rows with trained turns
    for index, messages in enumerate(prompts):
        messages = merge_system(messages) if merge else list(messages)
        row_tools = codec.defuse(tools[index]) if tools is not None and tools[index] else None
        row_answers = list(answers[index]) if answers is not None else []
        row_images = images[index] if images is not None else None
        prompt, stretches, texts = _row_texts(
            tokenizer, codec, messages, row_answers, index, row_tools, row_images, turns, default, eos
        )
        prompt_texts.append(prompt)
        if stretches is not None:
            segments[index] = stretches
        answer_texts += texts
        answer_after += [prompt] * len(texts)
        shape.append(len(texts))
    prompt_ids, masks = _prompt_ids(codec, prompt_texts, segments)
    answer_ids = iter(codec.encode(answer_texts, after=answer_after))
    return [(p, m, [next(answer_ids) for _ in range(k)]) for p, m, k in zip(prompt_ids, masks, shape)]


def _row_texts(
    tokenizer, codec, messages, row_answers, index, row_tools, row_images, turns: bool, default: bool, eos
) -> tuple[str, list[tuple[str, bool]] | None, list[str]]:
    """One row's protected texts: (its prompt, up to where the answer begins; its prompt's (text,
    trained) stretches (`_segments`) when it has trained earlier assistant turns, else None; each
    answer with its end of turn). Each text is in the form the template writes it in the whole
    conversation (`_as_written`, for contents a template may trim or rewrite)."""
    messages, row_answers = _with_calls(tokenizer, codec, messages, row_answers, index, row_tools)
    contents = [m["content"] for m in messages]
    n = len(messages)  # the answer's placeholder
    pieces, order = _lay_out(tokenizer, messages, index, row_tools)
    ragged = any(c != c.strip() for c in contents + row_answers)
    # earlier assistant turns, which a template may rewrite (Qwen3 drops their think blocks)
    free = frozenset(j for j, i in enumerate(order) if i < n and messages[i]["role"] == "assistant")
    written = [contents[i] if i < n else None for i in order]
    prompt, stretches, answer_texts = "", None, []
    for k, answer in enumerate(row_answers or [None]):
        final = _placeholder(n) if answer is None else answer  # prompts only: the placeholder stays
        shown = [c if c is not None else final for c in written]
        if ragged or free:  # the template may trim or rewrite: read the forms from a real rendering
            real = _render(tokenizer, [*messages, {"role": "assistant", "content": final}], index, row_tools)
            shown = _as_written(pieces, shown, real, free) or shown
        if k == 0:
            contents = shown[:-1]
            if row_images:
                contents = _place_images(contents, row_images, codec, index)
            prompt = "".join(codec.protect(p) + c for p, c in zip(pieces[:-2], contents)) + codec.protect(pieces[-2])
            trained = {
                j
                for j, i in enumerate(order[:-1])
                if turns and messages[i]["role"] == "assistant" and messages[i].get("loss", default)
            }
            if trained:
                stretches = _segments(codec, pieces, contents, trained)
        if answer is not None:
            answer_texts.append(shown[-1] + _end_of_turn(codec, pieces[-1], eos))
    return prompt, stretches, answer_texts


def _prompt_ids(
    codec: _Codec, prompt_texts: list[str], segments: dict[int, list[tuple[str, bool]]]
) -> tuple[list[list[int]], list[list[int] | None]]:
    """(ids of each prompt, its 0/1 mask of trained tokens or None): a prompt without trained turns is
    encoded whole; one with them stretch by stretch (`segments`), each as what follows the text before it."""
    plain = [i for i in range(len(prompt_texts)) if i not in segments]
    prompt_ids: list = [None] * len(prompt_texts)
    for i, ids in zip(plain, codec.encode([prompt_texts[i] for i in plain])):
        prompt_ids[i] = ids
    masks: list = [None] * len(prompt_texts)
    texts, after, owners = [], [], []
    for i, stretches in segments.items():
        before = None
        for text, flag in stretches:
            texts.append(text)
            after.append(before)
            owners.append((i, flag))
            before = text if before is None else before + text
    prompt_ids_parts: dict[int, tuple[list[int], list[int]]] = {i: ([], []) for i in segments}
    for (i, flag), ids in zip(owners, codec.encode(texts, after=after) if texts else []):
        prompt_ids_parts[i][0].extend(ids)
        prompt_ids_parts[i][1].extend([int(flag)] * len(ids))
    for i, (ids, mask) in prompt_ids_parts.items():
        prompt_ids[i], masks[i] = ids, mask
    return prompt_ids, masks


def encode_prompts(
    tokenizer,
    prompts: Sequence[list[dict]],
    system_prompt: str = "keep",
    images: Sequence[list[str] | None] | None = None,
    tools: Sequence[list[dict] | None] | None = None,
) -> list[list[int]]:
    """Prompt ids, ending where the assistant's answer begins (see `encode_conversations`)."""
    return [p for p, _ in encode_conversations(tokenizer, prompts, None, system_prompt, images, tools)]


def encode_answers(tokenizer, answers: Sequence[str]) -> list[list[int]]:
    """Answer ids, each followed by the template's end of turn (`end_of_turn_ids`), with no prompt: the
    answer is encoded as written (a template that trims contents is not consulted)."""
    codec = _codec(tokenizer)
    end = _end_of_turn_text(tokenizer)
    texts = [a + end for a in answers]
    return codec.encode(texts, after=[""] * len(texts))


def _end_of_turn_text(tokenizer) -> str:
    codec = _codec(tokenizer)
    if not tokenizer.chat_template:
        return codec.protect(tokenizer.eos_token or "")
    turn = [{"role": "user", "content": _placeholder(0)}, {"role": "assistant", "content": _placeholder(1)}]
    try:
        layout = _render(tokenizer, turn, 0)
    except TemplateRefusal:
        return codec.protect(tokenizer.eos_token or "")
    return _end_of_turn(codec, layout.split(_placeholder(1))[-1], tokenizer.eos_token)


def end_of_turn_ids(tokenizer) -> tuple[int, ...]:
    """The ids that end every answer alignlab trains on: what the chat template writes right after an
    assistant message, up to and including the first special token there (Llama-3 `<|eot_id|>`, Gemma
    `<end_of_turn>`, ChatML `<|im_end|>`, Mistral `</s>`, Phi-3 `<|end|>`), or that text and eos when
    it has no special token (eos alone without a template). The last id is the one generation stops at.

    A pure function of the tokenizer (its chat template and vocabulary); cached per tokenizer.
    """
    key = (tokenizer.chat_template, len(tokenizer), tokenizer.eos_token)
    cached = _END_OF_TURN.get(tokenizer)
    if cached is None or cached[0] != key:
        ids = tuple(_codec(tokenizer).encode([_end_of_turn_text(tokenizer)], after=[""])[0])
        cached = _END_OF_TURN[tokenizer] = (key, ids)
    return cached[1]


def fit_answer(prompt_len: int, answer: list[int], max_length: int) -> list[int] | None:
    """Truncate the answer from its end so prompt + answer fits; None when no answer token fits."""
    room = max_length - prompt_len
    if room < 1:
        return None
    return answer[:room]
