"""Multi-turn SFT (every assistant turn trained, nothing else), the default system message, tools given
to the chat template, and what data.truncation does to prompts that do not fit."""

from __future__ import annotations

import json

import pytest
import torch

from alignlab.data import LabelledDataModule, PairwiseDataModule, PromptDataModule, SFTDataModule
from alignlab.data.files import FileSource
from alignlab.data.tokenize import encode_conversations, encode_turns
from alignlab.data.truncation import shorten_prompt, turns_dropped
from alignlab.errors import ConfigError, DataError
from tests.conftest import ListSource
from tests.data.test_chat_encoding import END_OF_TURN, load_tokenizer
from tests.data.test_data import assistant, system, user
from tests.families import CHAT_FAMILIES, SYSTEM_REFUSING


def conversation(name):
    """Three user turns, two earlier assistant turns (the second with a think block, which Qwen3's real
    template would drop from an earlier turn), a system message where the template allows one."""
    turns = [user("hi there"), assistant("Hello! How can I help?"), user("12+30=")]
    turns += [assistant("<think>\nadd</think>\n\n42"), user("and 2+2?")]
    return turns if name in SYSTEM_REFUSING else [system("You are terse."), *turns]


def stretches(ids, mask, trained):
    """The runs of ids whose mask is `trained`, each as a list."""
    runs, current = [], []
    for token, flag in zip(ids, mask):
        if bool(flag) == trained:
            current.append(token)
        elif current:
            runs, current = runs + [current], []
    return runs + ([current] if current else [])


@pytest.mark.parametrize("name", CHAT_FAMILIES)
def test_every_earlier_assistant_turn_and_only_those_are_marked_in_each_family(family_dir, name):
    tokenizer = load_tokenizer(family_dir(name))
    prompt = conversation(name)
    ((ids, mask, (answer,)),) = encode_turns(tokenizer, [prompt], [["4"]])
    ((plain, (plain_answer,)),) = encode_conversations(tokenizer, [prompt], [["4"]])
    # the same ids as the prompt encoded whole: training every turn changes the mask, never the sequence
    assert ids == plain and answer == plain_answer and len(mask) == len(ids)
    # each trained stretch is one assistant turn as the template writes it (Qwen3 drops the think block of a
    # turn before the last user message), then the template's end of turn
    eot = END_OF_TURN[name]
    earlier = [m["content"] for m in prompt if m["role"] == "assistant"]
    if name == "qwen3":
        earlier = [c.split("</think>")[-1].lstrip("\n") for c in earlier]
    assert [tokenizer.decode(run) for run in stretches(ids, mask, True)] == [c + eot for c in earlier]
    # system and user text is never trained: it lies in the untrained stretches, whole
    untrained = "".join(tokenizer.decode(run) for run in stretches(ids, mask, False))
    for m in prompt:
        if m["role"] in ("user", "system"):
            assert m["content"] in untrained
    # the whole sequence is the template's own rendering of the conversation, up to the answer's end of turn
    full = tokenizer.apply_chat_template([*prompt, assistant("4")], tokenize=True, return_dict=True)["input_ids"]
    assert full[: len(ids) + len(answer)] == ids + answer


def test_qwen3_earlier_turns_are_found_in_its_layout_of_the_whole_conversation(family_dir):
    """Qwen3 writes the last assistant turn after an empty think block and earlier ones without: the
    mask follows the layout of the whole conversation (no think markup before an earlier turn), not the
    layout each turn would have as the last one."""
    tokenizer = load_tokenizer(family_dir("qwen3"))
    prompt = [user("hi"), assistant("Hello"), user("2+2=")]
    ((ids, mask, (answer,)),) = encode_turns(tokenizer, [prompt], [["4"]])
    text = tokenizer.decode(ids)
    assert text.count("<think>") == 1 and text.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    before = tokenizer.decode(ids[: mask.index(1)])
    assert before.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")  # no think block here
    # rendered as the last turn, the earlier turn would carry the think block: that is not what is trained
    alone = tokenizer.apply_chat_template(prompt[:2], tokenize=False)
    assert "<think>" in alone and "<think>" not in before


def test_a_prompt_without_assistant_turns_has_no_mask(tiny):
    _, tokenizer = tiny
    ((ids, mask, _),) = encode_turns(tokenizer, [[system("s"), user("2+2=")]], [["4"]])
    assert mask is None and ids == encode_conversations(tokenizer, [[system("s"), user("2+2=")]], [["4"]])[0][0]


def _sft(tokenizer, rows, **kwargs):
    dm = SFTDataModule(ListSource(rows), batch_size=len(rows), shuffle=False, max_length=256, **kwargs)
    dm.set_tokenizer(tokenizer)
    dm.setup()
    return dm, dm.collate(dm.splits["train"], with_prompts=False)


def test_sft_loss_mask_covers_every_assistant_turn_by_default_and_the_last_alone_on_request(tiny):
    _, tokenizer = tiny
    rows = [
        {"prompt": [system("Be brief."), user("hi"), assistant("hello"), user("2+2=")], "completion": "4"},
        {"prompt": [user("3+3=")], "completion": "6"},
    ]
    dm, batch = _sft(tokenizer, rows)
    last_dm, last = _sft(tokenizer, rows, train_on="last_assistant")
    assert torch.equal(batch["input_ids"], last["input_ids"])
    extra = batch["loss_mask"] - last["loss_mask"]
    assert extra.min() == 0  # the answer is trained in both
    assert tokenizer.decode(batch["input_ids"][0][extra[0].bool()]) == "hello<|im_end|>"
    assert not extra[1].any()  # a single-turn row: the same mask
    trained = tokenizer.decode(batch["input_ids"][0][batch["loss_mask"][0].bool()])
    assert "Be brief" not in trained and "2+2=" not in trained and "hi" not in trained
    # the step's token count is what the mask counts
    for module, b in ((dm, batch), (last_dm, last)):
        counts = [module.step_counts(ex)["completion_tokens"] for ex in module.splits["train"]]
        assert counts == b["loss_mask"][:, 1:].sum(-1).tolist()


def test_tool_messages_get_no_loss(tiny):
    _, tokenizer = tiny
    prompt = [user("add 2 and 2"), assistant('{"name": "add", "arguments": [2, 2]}')]
    prompt += [{"role": "tool", "content": "TOOLRESULT"}, user("so?")]
    _, batch = _sft(tokenizer, [{"prompt": prompt, "completion": "It is 4."}])
    trained = tokenizer.decode(batch["input_ids"][0][batch["loss_mask"][0].bool()])
    assert trained == '{"name": "add", "arguments": [2, 2]}<|im_end|>It is 4.<|im_end|>'


def test_single_turn_rows_encode_exactly_as_before(tiny):
    """The bundled arithmetic task is single-turn: its batches are the same under either train_on."""
    from alignlab.data.arith import ArithTask

    _, tokenizer = tiny
    batches = []
    for train_on in ("all_assistant", "last_assistant"):
        dm = SFTDataModule(ArithTask(seed=3, n_train=40, n_eval=4), batch_size=40, shuffle=False, train_on=train_on)
        dm.set_tokenizer(tokenizer)
        dm.setup()
        batches.append(dm.collate(dm.splits["train"], with_prompts=False))
        assert all("prompt_mask" not in ex for ex in dm.splits["train"])
    for key in ("input_ids", "attention_mask", "loss_mask"):
        assert torch.equal(batches[0][key], batches[1][key])


def test_default_system_message_is_added_to_rows_without_one(tiny):
    _, tokenizer = tiny
    rows = [{"prompt": [user("2+2=")], "completion": "4"}, {"prompt": [system("own"), user("3+3=")], "completion": "6"}]
    dm = SFTDataModule(ListSource(rows), system="Answer with a number.")
    prompts = [r["prompt"] for r in dm.read()["train"]]
    assert prompts == [[system("Answer with a number."), user("2+2=")], [system("own"), user("3+3=")]]


def test_tools_reach_the_chat_template(tiny, tmp_path):
    _, tokenizer = tiny
    tool = {"type": "function", "function": {"name": "add_numbers", "parameters": {"type": "object"}}}
    template = (
        "{% if tools %}<|im_start|>system\nTOOLS:{% for t in tools %}{{ t.function.name }}{% endfor %}<|im_end|>\n"
        "{% endif %}{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    )
    import copy

    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.chat_template = template
    path = tmp_path / "tools.jsonl"
    rows = [{"prompt": "2+2=", "completion": "4", "tools": json.dumps([tool])}, {"prompt": "3+3=", "completion": "6"}]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    dm = SFTDataModule(FileSource(str(path), eval_fraction=0), shuffle=False)
    dm.set_tokenizer(tokenizer)
    dm.setup()
    first, second = (tokenizer.decode(ex["prompt_ids"]) for ex in dm.splits["train"])
    assert first.startswith("<|im_start|>system\nTOOLS:add_numbers<|im_end|>") and "TOOLS" not in second


def test_turns_dropped_keeps_the_system_message_and_the_last_user_turn():
    prompt = [system("s"), user("a"), assistant("A"), user("b"), assistant("B"), {"role": "tool", "content": "t"}]
    prompt += [user("c")]
    assert turns_dropped(prompt) == [
        [system("s"), user("b"), assistant("B"), {"role": "tool", "content": "t"}, user("c")],
        [system("s"), user("c")],
    ]
    assert turns_dropped([user("only")]) == []
    assert turns_dropped([assistant("x"), user("q")]) == [[user("q")]]


def test_shorten_prompt_finds_the_least_cut_that_fits():
    length = lambda messages: sum(len(m["content"]) + 2 for m in messages)  # noqa: E731
    prompt = [system("s"), user("a" * 20), assistant("A" * 20), user("b" * 10)]
    # keep_end: the oldest turn dropped, so the answer's 5 tokens fit in 20
    assert shorten_prompt(prompt, "keep_end", length, 5, 20) == [system("s"), user("b" * 10)]
    assert shorten_prompt(prompt, "keep_end", length, 5, 10) is None  # the shortest allowed prompt takes 15
    # keep_start: the last user message cut from its end, to leave room for the answer (at most half max_length)
    # (the messages before it take 47, the cut message n + 2)
    assert shorten_prompt(prompt, "keep_start", length, 5, 60) == [*prompt[:3], user("b" * 6)]
    assert shorten_prompt(prompt, "keep_start", length, 100, 110) == [*prompt[:3], user("b" * 6)]  # answer: 55
    # no cut leaves the answer's room: the longest cut that leaves room for one answer token
    assert shorten_prompt(prompt, "keep_start", length, 30, 55) == [*prompt[:3], user("b" * 5)]
    assert shorten_prompt(prompt, "keep_start", length, 5, 45) is None


def _rows(kind):
    """A long history before a short question, a long question, a short question; as rows of `kind`."""
    prompts = [
        [system("Be brief."), user("word " * 40), assistant("reply " * 40), user("2+2=")],
        [user("long " * 60 + "end")],
        [user("3+3=")],
    ]
    answers = {"sft": {"completion": "4"}, "pairwise": {"chosen": "4", "rejected": "5"}, "prompt": {}}[kind]
    return [{"prompt": p, **answers} for p in prompts]


@pytest.mark.parametrize("module", [SFTDataModule, PairwiseDataModule, PromptDataModule])
def test_truncation_keeps_the_end_or_the_start_or_drops_or_refuses(tiny, module):
    _, tokenizer = tiny

    def setup(truncation):
        dm = module(ListSource(_rows(module.kind)), max_length=64, batch_size=2, truncation=truncation)
        dm.set_tokenizer(tokenizer)
        dm.setup()
        return dm

    dropped = setup("drop_row")
    assert dropped.dropped["train"] == 2 and dropped.shortened["train"] == 0
    end = setup("keep_end")  # the history goes; a single long question cannot lose turns
    assert end.dropped["train"] == 1 and end.shortened["train"] == 1
    assert end.read()["train"][0]["prompt"] == [system("Be brief."), user("2+2=")]
    short = encode_conversations(tokenizer, [[system("Be brief."), user("2+2=")]])[0][0]
    assert end.splits["train"][0]["prompt_ids"] == short
    start = setup("keep_start")  # the long question is cut; the history is not the last user message
    assert start.dropped["train"] == 1 and start.shortened["train"] == 1
    question = start.read()["train"][1]["prompt"][0]["content"]
    assert question.startswith("long long") and not question.endswith("end")
    ex = start.splits["train"][0]
    assert len(ex["prompt_ids"]) < 64
    if module.kind == "sft":
        assert len(ex["prompt_ids"]) + len(ex["completion_ids"]) <= 64  # the answer fits whole
    with pytest.raises(DataError, match=r"the prompt takes \d+ tokens.*max_length=64.*data\.truncation=error"):
        setup("error")


def test_truncation_error_names_file_row_and_max_length(tiny, tmp_path):
    _, tokenizer = tiny
    path = tmp_path / "long.jsonl"
    path.write_text(
        json.dumps({"prompt": "ok", "completion": "1"}) + "\n" + json.dumps({"prompt": "x " * 80, "completion": "1"})
    )
    dm = SFTDataModule(FileSource(str(path), eval_fraction=0), max_length=30, truncation="error")
    dm.set_tokenizer(tokenizer)
    with pytest.raises(DataError, match=rf"^{path}, row 2, field 'prompt': the prompt takes \d+ tokens.*max_length=30"):
        dm.setup()


def test_bad_options_are_refused_naming_the_key():
    with pytest.raises(ConfigError, match="data.truncation must be one of"):
        SFTDataModule(ListSource([]), truncation="left")
    with pytest.raises(ConfigError, match="data.train_on must be one of"):
        SFTDataModule(ListSource([]), train_on="everything")
    with pytest.raises(ConfigError, match="data.columns renames the columns of data files"):
        LabelledDataModule(ListSource([]), columns={"q": "prompt"}).read()


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("data.truncation=left", "data.truncation must be one of"),
        ("data.train_on=every", "data.train_on must be one of"),
        ("data.columns={a:prompt,b:prompt}", r"data.columns maps several columns onto \['prompt'\]"),
        ("data.columns=[a,b]", "data.columns must map the file's column names"),
        ("data.system=[a]", "data.system must be text"),
        ("data.row_converter=nowhere_at_all.fn", "data.row_converter 'nowhere_at_all.fn' could not be imported"),
        ("data.max_tokens_per_micro_batch=0", "data.max_tokens_per_micro_batch must be a whole number >= 1 or null"),
    ],
)
def test_config_checks_name_the_data_key(tmp_path, override, message):
    from alignlab.runner.config import check_config
    from tests.conftest import compose

    data = "data=custom_sft" if "train_on" in override else "data=custom_pairs"
    algorithm = "algorithm=sft" if "train_on" in override else "algorithm=dpo"
    cfg = compose([algorithm, data, "data.source.path=x.jsonl", override], tmp_path)
    with pytest.raises(ConfigError, match=message):
        check_config(cfg)
