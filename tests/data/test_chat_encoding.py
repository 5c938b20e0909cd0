"""How rows become ids through each family's chat template (issue 15, items 1, 4 and 5): answers end
with the template's end of turn, control-token text in a message stays text, and a template that
refuses a row stops the run with a DataError naming file, row and field, before anything is written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from alignlab.data import LabelledDataModule, PairwiseDataModule, PromptDataModule, SFTDataModule
from alignlab.data.files import FileSource
from alignlab.data.tokenize import encode_conversations, encode_prompts, end_of_turn_ids, merge_system
from alignlab.errors import DataError
from tests.conftest import QUIET, ListSource, compose
from tests.families import CHAT_FAMILIES, FAMILIES, SYSTEM_REFUSING, control_tokens

CASES = Path("/work/shared/cases/special_token_in_text")
END_OF_TURN = {
    "llama3": "<|eot_id|>",
    "qwen25": "<|im_end|>",
    "qwen3": "<|im_end|>",
    "mistral": "</s>",
    "gemma2": "<end_of_turn>",
    "gemma3": "<end_of_turn>",
    "phi3": "<|end|>",
}


def user(text):
    return {"role": "user", "content": text}


def load_tokenizer(folder):
    """The tokenizer as a run loads it (pad set where the family has none; ChatML for SFT without a template)."""
    from alignlab.models.loading import load_tokenizer as load

    cfg = OmegaConf.create({"trust_remote_code": False, "chat_template": None})
    return load(str(folder), cfg, require_chat_template=False)


def conversations(name):
    """Single- and multi-turn prompts, with a system message where the template allows one."""
    out = [
        [user("What is 2+2?")],
        [user(" What is 2+2?\n")],  # templates that trim contents (Llama-3, Gemma) are followed
        [user("hi there"), {"role": "assistant", "content": "Hello! How can I help?"}, user("12+30=")],
    ]
    if name not in SYSTEM_REFUSING:
        out += [[{"role": "system", "content": "You are terse."}, user("Say hi")]]
    return out


ANSWERS = ["The answer is 4.", "42", " an answer with space around \n"]


@pytest.mark.parametrize("name", CHAT_FAMILIES)
def test_prompt_and_answer_ids_are_the_template_conversation_up_to_its_end_of_turn(family_dir, name):
    tokenizer = load_tokenizer(family_dir(name))
    eot = end_of_turn_ids(tokenizer)
    assert tokenizer.convert_ids_to_tokens(list(eot)) == [END_OF_TURN[name]]  # Gemma: <end_of_turn>, not <eos>
    for prompt in conversations(name):
        encoded = encode_conversations(tokenizer, [prompt], [ANSWERS])[0]
        for answer, ids in zip(ANSWERS, encoded[1]):
            conversation = [*prompt, {"role": "assistant", "content": answer}]
            full = tokenizer.apply_chat_template(conversation, tokenize=True, return_dict=True)["input_ids"]
            trained = encoded[0] + ids
            assert trained == full[: len(trained)], (prompt, answer)
            assert tuple(ids[-len(eot) :]) == eot and eot[0] not in ids[: -len(eot)]
            # what follows in the template's own ids is at most its trailing newline / closing eos, never the answer
            assert len(full) - len(trained) <= 2


def test_qwen3_prompt_is_the_prefix_of_the_conversation_not_its_generation_prompt(family_dir):
    """Qwen3's generation prompt (thinking on) lacks the empty think block its assistant turns carry:
    the prompt alignlab trains and samples after is the conversation's own prefix, think block included."""
    tokenizer = load_tokenizer(family_dir("qwen3"))
    prompt = [user("2+2=")]
    ids = encode_prompts(tokenizer, [prompt])[0]
    assert tokenizer.decode(ids).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    generation = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
    assert tokenizer.decode(ids) != generation and tokenizer.decode(ids).startswith(generation)
    full = tokenizer.apply_chat_template([*prompt, {"role": "assistant", "content": "4"}], tokenize=False)
    assert tokenizer(full, add_special_tokens=False)["input_ids"][: len(ids)] == ids


def test_end_of_turn_without_a_template_or_without_special_markers_ends_with_eos(family_dir, tiny):
    _, tiny_tokenizer = tiny
    assert end_of_turn_ids(tiny_tokenizer) == (tiny_tokenizer.convert_tokens_to_ids("<|im_end|>"),)
    from transformers import AutoTokenizer

    gpt2 = AutoTokenizer.from_pretrained(family_dir("gpt2"))
    assert end_of_turn_ids(gpt2) == (gpt2.eos_token_id,)  # no template: eos alone
    chatml = load_tokenizer(family_dir("gpt2"))  # ChatML installed for SFT: its markers become special tokens
    assert end_of_turn_ids(chatml) == (chatml.convert_tokens_to_ids("<|im_end|>"),)
    from alignlab.models.loading import load_tokenizer as load

    plain = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"  # no marker at all
    cfg = OmegaConf.create({"trust_remote_code": False, "chat_template": plain})
    eot = end_of_turn_ids(load(str(family_dir("gpt2")), cfg, require_chat_template=False))
    assert eot == (gpt2.eos_token_id,)  # the text after the answer (a newline, stripped), then eos


def test_merge_system_puts_system_text_before_the_next_user_message():
    messages = [
        {"role": "system", "content": "Be brief."},
        user("2+2="),
        {"role": "assistant", "content": "4"},
        user("3+3="),
    ]
    assert merge_system(messages) == [user("Be brief.\n\n2+2="), messages[2], messages[3]]
    assert merge_system([{"role": "system", "content": ""}, user("hi")]) == [user("hi")]
    assert merge_system([user("hi")]) == [user("hi")]


@pytest.mark.parametrize("name", FAMILIES)
def test_control_token_text_in_messages_and_answers_stays_text(family_dir, name):
    tokenizer = load_tokenizer(family_dir(name))
    special = set(tokenizer.all_special_ids)
    eot = end_of_turn_ids(tokenizer)
    spellings = {*control_tokens(name), "<|im_end|>", "<|im_start|>", "<|endoftext|>", tokenizer.pad_token}
    for spelling in sorted(spellings):
        question, answer = f"Say {spelling} then stop", f"I say {spelling} here"
        ((prompt_ids, (answer_ids,)),) = encode_conversations(tokenizer, [[user(question)]], [[answer]])
        body = answer_ids[: len(answer_ids) - len(eot)]
        assert tuple(answer_ids[len(body) :]) == eot
        assert not special & set(body), (spelling, tokenizer.convert_ids_to_tokens(body))
        assert tokenizer.decode(body) == answer
        # the question adds no special id to the prompt: it has as many as a plain question's prompt
        plain = encode_prompts(tokenizer, [[user("plain")]])[0]
        assert sum(i in special for i in prompt_ids) == sum(i in special for i in plain)
        assert question in tokenizer.decode(prompt_ids)


def case_rows() -> list[dict]:
    return [json.loads(line) for line in (CASES / "pairs.jsonl").read_text().splitlines() if line.strip()]


def module(cls, rows, tokenizer, **kwargs):
    dm = cls(ListSource(rows), batch_size=2, max_length=256, **kwargs)
    dm.set_tokenizer(tokenizer)
    dm.setup()
    return dm.splits["train"]


def test_special_token_case_rows_get_the_text_ids_in_every_data_kind(tiny):
    """The shared case on the embedded byte-level tokenizer, where the right ids are the bytes: the
    prompt's fake `<|im_end|>\\n<|im_start|>assistant` turn and the answers' markers stay bytes."""
    _, tokenizer = tiny
    bot, eos, pad = (tokenizer.convert_tokens_to_ids(t) for t in ("<|im_start|>", "<|im_end|>", "<|endoftext|>"))

    def text(s):
        return list(s.encode())

    raw = case_rows()
    rows = [{"prompt": [user(r["prompt"])], "chosen": r["chosen"], "rejected": r["rejected"]} for r in raw]
    want_prompt = [[bot, *text("user\n" + r["prompt"]), eos, *text("\n"), bot, *text("assistant\n")] for r in raw]
    want_chosen = [[*text(r["chosen"]), eos] for r in raw]

    pairs = module(PairwiseDataModule, {"pairwise": rows}, tokenizer)
    assert [e["prompt_ids"] for e in pairs] == want_prompt
    assert [e["chosen_ids"] for e in pairs] == want_chosen
    assert [e["rejected_ids"] for e in pairs] == [[*text(r["rejected"]), eos] for r in raw]
    assert all(pad not in e["chosen_ids"] and e["chosen_ids"].count(eos) == 1 for e in pairs)

    sft = module(SFTDataModule, {"sft": [{"prompt": r["prompt"], "completion": r["chosen"]} for r in rows]}, tokenizer)
    assert [e["prompt_ids"] for e in sft] == want_prompt and [e["completion_ids"] for e in sft] == want_chosen

    labelled = [{"prompt": r["prompt"], "completion": r["chosen"], "label": True} for r in rows]
    kto = module(LabelledDataModule, {"labelled": labelled}, tokenizer)
    assert [e["prompt_ids"] for e in kto] == want_prompt and [e["completion_ids"] for e in kto] == want_chosen

    prompts = module(PromptDataModule, {"prompt": [{"prompt": r["prompt"]} for r in rows]}, tokenizer)
    assert [e["prompt_ids"] for e in prompts] == want_prompt  # what PPO and GRPO sample after


@pytest.mark.parametrize("name", FAMILIES)
def test_special_token_case_rows_stay_text_in_every_data_kind_on_every_family(family_dir, name):
    tokenizer = load_tokenizer(family_dir(name))
    special, eot = set(tokenizer.all_special_ids), end_of_turn_ids(tokenizer)
    rows = [{"prompt": [user(r["prompt"])], "chosen": r["chosen"], "rejected": r["rejected"]} for r in case_rows()]
    plain = encode_prompts(tokenizer, [[user("plain")]])[0]
    pairs = module(PairwiseDataModule, {"pairwise": rows}, tokenizer)
    for row, ex in zip(rows, pairs):
        for key in ("chosen", "rejected"):
            body = ex[f"{key}_ids"][: -len(eot)]
            assert tuple(ex[f"{key}_ids"][-len(eot) :]) == eot and not special & set(body)
            assert tokenizer.decode(body) == row[key]
        assert sum(i in special for i in ex["prompt_ids"]) == sum(i in special for i in plain)
    sft = [{"prompt": r["prompt"], "completion": r["chosen"]} for r in rows]
    labelled = [{**r, "label": True} for r in sft]
    prompts = [{"prompt": r["prompt"]} for r in rows]
    for kind, cls, data, key in [
        ("sft", SFTDataModule, sft, "completion_ids"),
        ("labelled", LabelledDataModule, labelled, "completion_ids"),
        ("prompt", PromptDataModule, prompts, None),
    ]:
        examples = module(cls, {kind: data}, tokenizer)
        assert [e["prompt_ids"] for e in examples] == [e["prompt_ids"] for e in pairs]  # PPO/GRPO prompts too
        if key:
            assert [e[key] for e in examples] == [e["chosen_ids"] for e in pairs]


def write_rows(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


SYSTEM_ROW = {
    "messages": [
        {"role": "system", "content": "Answer with a number."},
        user("2+2="),
        {"role": "assistant", "content": "4"},
    ]
}


@pytest.mark.parametrize("name", SYSTEM_REFUSING)
def test_a_row_the_template_refuses_is_a_data_error_naming_file_row_and_field(family_dir, tmp_path, name):
    tokenizer = load_tokenizer(family_dir(name))
    plain = {"messages": [user("1+1="), {"role": "assistant", "content": "2"}]}
    path = write_rows(tmp_path / "sft.jsonl", [plain, SYSTEM_ROW, plain])
    dm = SFTDataModule(FileSource(path, eval_fraction=0.0), max_length=256)
    dm.set_tokenizer(tokenizer)
    reason = "System role not supported" if name.startswith("gemma") else "roles must alternate"
    with pytest.raises(DataError, match=rf"sft\.jsonl, row 2, field 'messages': .*{reason}.*data\.system_prompt=merge"):
        dm.setup()

    dm = SFTDataModule(FileSource(path, eval_fraction=0.0), max_length=256, system_prompt="merge")
    dm.set_tokenizer(tokenizer)
    dm.setup()
    assert "Answer with a number.\n\n2+2=" in tokenizer.decode(dm.splits["train"][1]["prompt_ids"])

    # roles that do not alternate: the template's reason, and the pair's row for unpaired KTO rows
    pair = {"prompt": [user("a"), user("b")], "chosen": "x", "rejected": "y"}
    path = write_rows(tmp_path / "pairs.jsonl", [{"prompt": "c", "chosen": "x", "rejected": "y"}, pair])
    dm = LabelledDataModule(FileSource(path, eval_fraction=0.0), unpair=True, max_length=256)
    dm.set_tokenizer(tokenizer)
    with pytest.raises(DataError, match=r"pairs\.jsonl, row 2, field 'prompt': .*must alternate user/assistant"):
        dm.setup()


def test_system_prompt_setting_is_checked():
    from alignlab.errors import ConfigError

    with pytest.raises(ConfigError, match="data.system_prompt must be one of"):
        SFTDataModule(ListSource([]), system_prompt="drop")


def test_gemma_run_stops_before_writing_on_a_system_message_and_trains_with_merge(family_dir, tmp_path):
    from alignlab.train import train

    path = write_rows(tmp_path / "sft.jsonl", [SYSTEM_ROW] * 8)
    base = [
        "algorithm=sft",
        "data=custom_sft",
        f"data.source.path={path}",
        "data.source.eval_fraction=0.25",
        f"model.path={family_dir('gemma2')}",
        "model.tiny=null",
        "model.dtype=float32",
        "trainer.max_steps=2",
        "batch_size=2",
        "evaluation.at_start=false",
        *QUIET,
    ]
    refused = tmp_path / "refused"
    with pytest.raises(DataError, match=r"row \d, field 'messages': .*System role not supported"):
        train(compose(base, refused))
    assert not (refused / "config.yaml").exists()
    result = train(compose([*base, "data.system_prompt=merge"], tmp_path / "merged"))
    assert (Path(result["run_dir"]) / "config.yaml").exists() and result["steps"] == 2


def test_any_text_is_encoded_as_its_bytes_on_the_embedded_tokenizer(tiny):
    """On the byte-level tokenizer the right ids of any content are its UTF-8 bytes: whatever control-token
    spellings, template syntax or private-use characters it holds."""
    import unicodedata

    from hypothesis import given, settings
    from hypothesis import strategies as st

    _, tokenizer = tiny
    bot, eos = tokenizer.convert_tokens_to_ids("<|im_start|>"), tokenizer.convert_tokens_to_ids("<|im_end|>")
    pieces = st.sampled_from(["<|im_end|>", "<|im_start|>", "<|endoftext|>", "{{ x }}", "\ue000", "\n", " ", "é"])
    text = st.lists(st.one_of(pieces, st.text(max_size=5)), max_size=6).map("".join)
    text = text.filter(lambda t: t.strip() and unicodedata.normalize("NFC", t) == t)

    @settings(max_examples=60, deadline=None)
    @given(question=text, answer=text)
    def check(question, answer):
        ((prompt, (ids,)),) = encode_conversations(tokenizer, [[user(question)]], [[answer]])
        assert prompt == [bot, *f"user\n{question}".encode(), eos, *b"\n", bot, *b"assistant\n"]
        assert ids == [*answer.encode(), eos]

    check()
