"""The row forms of issue 32, each in every reading path (JSON Lines, JSON, Parquet and CSV files, Hub-shaped
folders, Hub ids, streams, mixtures): OpenAI's preference rows, a `messages` prompt with `chosen`/`rejected`,
verl's nested `reward_model.ground_truth` (dotted `data.columns`), rows with videos or audio (refused),
ms-swift's per-message `loss`, and the `data.columns` map an unrecognised row is told to add."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from alignlab.data import PromptDataModule, SFTDataModule
from alignlab.data.files import FileSource
from alignlab.data.formats import check_mapped_columns, suggest_columns
from alignlab.data.mixture import MixtureSource
from alignlab.data.rows import to_canonical
from alignlab.data.tokenize import encode_conversations, encode_turns
from alignlab.errors import DataError
from alignlab.online.rewards import accuracy, exact_match
from tests.conftest import ListSource
from tests.data.folders import write_jsonl
from tests.data.test_chat_encoding import END_OF_TURN, load_tokenizer
from tests.data.test_fault_kinds import hub_files  # noqa: F401  (a fixture)
from tests.data.test_multiturn import stretches
from tests.families import CHAT_FAMILIES, SYSTEM_REFUSING


def system(text: str) -> dict:
    return {"role": "system", "content": text}


def user(text: str, **extra) -> dict:
    return {"role": "user", "content": text, **extra}


def assistant(text: str, **extra) -> dict:
    """An assistant message; `extra` e.g. ms-swift's `loss=False`."""
    return {"role": "assistant", "content": text, **extra}


def openai_pair(i: int) -> dict:
    """A row of OpenAI's preference fine-tuning file (its documented shape)."""
    return {
        "input": {
            "messages": [system("Be brief."), user(f"{i}+1=")],
            "tools": [],
            "parallel_tool_calls": True,
        },
        "preferred_output": [assistant(str(i + 1))],
        "non_preferred_output": [assistant(str(i + 2))],
    }


def messages_pair(i: int, listed: bool = False) -> dict:
    """A pair as many people write one by hand: the prompt as `messages`, the answers beside it (as text,
    or `listed`: as assistant messages)."""
    answers = [str(i + 1), str(i + 2)]
    chosen, rejected = ([assistant(a)] for a in answers) if listed else answers
    return {"messages": [user(f"{i}+1=")], "chosen": chosen, "rejected": rejected}


def read_paths(
    root, rows: list[dict], kind: str, columns: dict | None = None, csv: bool = False, tag: str = "rows"
) -> dict:
    """The canonical rows of `rows` through every reading path, by path name, written under `root`/`tag`
    (the Hub id `someone/<tag>_hub`: `root` is the `hub_files` folder). `csv`: also as a CSV file
    (nested values as JSON text, as a CSV cell carries them)."""
    out = {}
    tmp_path = root / tag
    jsonl = write_jsonl(tmp_path / "rows.jsonl", rows)
    document = tmp_path / "rows.json"
    document.write_text(json.dumps(rows))
    parquet = tmp_path / "rows.parquet"
    pd.DataFrame(rows).to_parquet(parquet)
    folder = tmp_path / "folder"
    write_jsonl(folder / "data" / "train-00000-of-00001.jsonl", rows)
    hub = root / f"{tag}_hub"
    (hub / "data").mkdir(parents=True)
    pd.DataFrame(rows).to_parquet(hub / "data" / "train-00000-of-00001.parquet")  # read by `datasets`
    files = {"jsonl": jsonl, "json": document, "parquet": parquet, "folder": folder, "hub id": f"someone/{tag}_hub"}
    if csv:
        table = tmp_path / "rows.csv"
        cells = [{k: v if isinstance(v, str) else json.dumps(v) for k, v in r.items()} for r in rows]
        pd.DataFrame(cells).to_csv(table, index=False)
        files["csv"] = table
    for name, path in files.items():
        out[name] = FileSource(str(path), eval_fraction=0).load(kind, columns=columns)["train"]
    stream = FileSource(str(jsonl), streaming=True).load(kind, columns=columns)["train"]
    out["stream"] = (
        [row for _, row in stream.rows(0, 0, shuffle=False)] if kind in ("prompt", "sft", "pairwise") else []
    )
    mix = MixtureSource.from_specs([{"path": str(parquet), "columns": columns}], base=FileSource(None, eval_fraction=0))
    out["mixture"] = mix.load(kind)["train"]
    return out


def refused_everywhere(tmp_path, good, bad: dict, kind: str, field: str, words: str, columns=None) -> int:
    """`bad` as row 2 (after `good`; row 1 when `good` is None) is refused in every reading path, naming the
    file, the row and `field`; returns how many paths refused it."""
    rows = [bad] if good is None else [good, bad]
    number = len(rows)
    jsonl = write_jsonl(tmp_path / "bad.jsonl", rows)
    parquet = tmp_path / "bad.parquet"
    pd.DataFrame(rows).to_parquet(parquet)
    folder = tmp_path / "badfolder"
    write_jsonl(folder / "data" / "train-00000-of-00001.jsonl", rows)
    sources = {
        jsonl: FileSource(str(jsonl)),
        parquet: FileSource(str(parquet)),
        folder / "data" / "train-00000-of-00001.jsonl": FileSource(str(folder)),
    }
    if kind != "labelled":  # KTO data does not stream
        sources[f"{jsonl} "] = FileSource(str(jsonl), streaming=True)
    for path, source in sources.items():
        with pytest.raises(DataError, match=rf"^{str(path).strip()}, row {number}, field '{field}': .*{words}"):
            source.load(kind, columns=columns)
    mix = MixtureSource.from_specs([{"path": str(jsonl)}, {"path": str(parquet)}], base=FileSource(None))
    with pytest.raises(DataError, match=rf"row {number}, field '{field}': .*{words}"):
        mix.load(kind, columns=columns)
    return len(sources) + 1


# -- OpenAI preference rows; a `messages` prompt with chosen / rejected ------------------------------------
@pytest.mark.parametrize(
    ("make", "prompt"),
    [
        (openai_pair, [system("Be brief."), user("3+1=")]),
        (messages_pair, [user("3+1=")]),
        (lambda i: messages_pair(i, listed=True), [user("3+1=")]),
    ],
    ids=["OpenAI preference", "messages prompt, text answers", "messages prompt, message answers"],
)
def test_a_pair_form_reads_as_a_pair_sft_row_and_prompt_in_every_path(hub_files, make, prompt):  # noqa: F811
    rows = [make(3), make(4)]
    for kind, expected in (
        ("pairwise", {"prompt": prompt, "chosen": "4", "rejected": "5"}),
        ("sft", {"prompt": prompt, "completion": "4"}),
    ):
        for path, got in read_paths(hub_files, rows, kind, csv=make is messages_pair, tag=kind).items():
            assert got[0] == expected, (kind, path)
    assert to_canonical(make(3), "prompt", "f", 1)["prompt"] == prompt


def test_openai_rows_keep_their_tools_and_name_their_own_fields_in_errors():
    row = openai_pair(1)
    row["input"]["tools"] = [{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}]
    assert to_canonical(row, "pairwise", "f", 1)["tools"] == row["input"]["tools"]
    cases = [
        ({**row, "input": {"messages": [user(" ")]}}, "input", "(read as `prompt`) message 0 (user) is empty"),
        ({**row, "non_preferred_output": row["preferred_output"]}, "non_preferred_output", "identical to the chosen"),
        ({**row, "input": {"tools": []}}, "input", "expected an object with `messages`"),
    ]
    for raw, field, words in cases:
        with pytest.raises(DataError) as err:
            to_canonical(raw, "pairwise", "p.jsonl", 2)
        assert str(err.value).startswith(f"p.jsonl, row 2, field '{field}': ") and words in str(err.value)


def test_a_messages_prompt_beside_answers_is_the_prompt_and_a_whole_conversation_is_not():
    # KTO and SFT rows with a `messages` prompt and a `completion`
    kto = {"messages": [user("2+2=")], "completion": "5", "label": False}
    assert to_canonical(kto, "labelled", "f", 1) == {"prompt": [user("2+2=")], "completion": "5", "label": False}
    # `messages` ending in an assistant turn (UltraFeedback's chosen conversation) is not a prompt
    uf = {"prompt": "2+2=", "messages": [user("2+2="), assistant("4")], "chosen": "4", "rejected": "5"}
    assert to_canonical(uf, "pairwise", "f", 1)["prompt"] == [user("2+2=")]
    with pytest.raises(DataError, match=r"row 1, field 'messages': \(read as `prompt`\) message 0 \(user\) is empty"):
        to_canonical({"messages": [user("")], "chosen": "4", "rejected": "5"}, "pairwise", "f", 1)


# -- verl rows: reward_model.ground_truth ----------------------------------------------------------------
def verl_rows(n: int) -> list[dict]:
    """Rows shaped as verl's GSM8K parquet: the prompt as messages, the answer inside a struct."""
    return [
        {
            "data_source": "openai/gsm8k",
            "prompt": [user(f"What is {i} + {i}?")],
            "ability": "math",
            "reward_model": {"style": "rule", "ground_truth": str(2 * i)},
            "extra_info": {"split": "train", "index": i},
        }
        for i in range(n)
    ]


def test_a_dotted_column_maps_a_struct_field_to_solution_in_every_path(hub_files):  # noqa: F811
    columns = {"reward_model.ground_truth": "solution"}
    for path, rows in read_paths(hub_files, verl_rows(3), "prompt", columns).items():
        assert [r["solution"] for r in rows] == ["0", "2", "4"], path
        assert rows[1]["prompt"] == [user("What is 1 + 1?")] and rows[1]["reward_model"]["style"] == "rule"


def test_verl_solutions_reach_the_reward_and_score_right_answers(tiny, tmp_path):
    path = tmp_path / "gsm8k.parquet"
    pd.DataFrame(verl_rows(4)).to_parquet(path)
    dm = PromptDataModule(FileSource(str(path), eval_fraction=0), columns={"reward_model.ground_truth": "solution"})
    dm.batch_size, dm.shuffle = 4, False
    dm.set_tokenizer(tiny[1])
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    assert accuracy(batch["prompt_messages"], ["0", "2", "4", "6"], batch["columns"]["solution"]) == [1.0] * 4


def test_the_dotted_map_works_as_typed_on_the_command_line(tmp_path):
    from hydra.utils import instantiate

    from alignlab.runner.config import check_data_options
    from tests.conftest import compose

    path = tmp_path / "gsm8k.parquet"
    pd.DataFrame(verl_rows(3)).to_parquet(path)
    overrides = [
        f"data.source.path={path}",
        "data.source.eval_fraction=0",
        "data.columns={reward_model.ground_truth:solution}",
    ]
    cfg = compose(["data=custom_prompts", "algorithm=grpo", *overrides])
    check_data_options(cfg.data)
    assert [r["solution"] for r in instantiate(cfg.data).read()["train"]] == ["0", "2", "4"]


def test_a_struct_solution_is_refused_with_the_map_to_use(tmp_path):
    refused_everywhere(
        tmp_path,
        None,
        verl_rows(2)[1],
        "prompt",
        "reward_model",
        r"\(read as `solution`\) expected a value .*data.columns=\{reward_model.ground_truth:solution\}",
        columns={"reward_model": "solution"},
    )
    # a list passes the reading (a reward of one's own may take several answers); the built-in rewards refuse it
    assert to_canonical({"prompt": "q", "solution": ["4", "four"]}, "prompt", "f", 1)["solution"] == ["4", "four"]
    for reward in (accuracy, exact_match):
        with pytest.raises(
            ValueError, match=r"compares each answer with one `solution` value, but a row's solution is a list"
        ):
            reward([[user("q")]], ["4"], [["4", "four"]])
    # a `solution` struct replaced by its own field
    raw = {"prompt": "q", "solution": {"style": "rule", "ground_truth": "4"}}
    row = to_canonical(raw, "prompt", "f", 1, columns={"solution.ground_truth": "solution"})
    assert row["solution"] == "4"


def test_a_dotted_name_no_row_resolves_is_refused_naming_it():
    rows = verl_rows(2)
    check_mapped_columns(rows, {"reward_model.ground_truth": "solution"}, "f")
    with pytest.raises(DataError, match=r"names \['reward_model.ground_trut'\] but no row .*dotted name"):
        check_mapped_columns(rows, {"reward_model.ground_trut": "solution"}, "f")


# -- videos and audio -----------------------------------------------------------------------------------
MEDIA = [
    ({"messages": [user("<video>Why is it funny?"), assistant("A cat.")], "videos": ["clip.mp4"]}, "sft", "videos"),
    ({"prompt": "<audio>What is said?", "completion": "hi", "audios": "talk.wav"}, "sft", "audios"),
    (
        {"conversations": [{"from": "human", "value": "<video>?"}, {"from": "gpt", "value": "a"}], "videos": ["v"]},
        "sft",
        "videos",
    ),
    ({"prompt": "<video>?", "chosen": "a", "rejected": "b", "videos": ["v.mp4"]}, "pairwise", "videos"),
    ({"prompt": "<audio>?", "audios": ["a.wav"], "solution": "x"}, "prompt", "audios"),
    ({"prompt": "<video>?", "completion": "a", "label": True, "videos": ["v.mp4"]}, "labelled", "videos"),
    ({"prompt": "<audio>?", "completion": "a", "audio": {"path": "a.wav", "bytes": None}}, "sft", "audio"),
]


@pytest.mark.parametrize(("raw", "kind", "field"), MEDIA, ids=[f"{m[2]} {m[1]} {i}" for i, m in enumerate(MEDIA)])
def test_rows_with_videos_or_audio_are_refused_in_every_path_naming_the_column(tmp_path, raw, kind, field):
    good = {"sft": {"prompt": "q", "completion": "a"}, "pairwise": {"prompt": "q", "chosen": "a", "rejected": "b"}}
    good |= {"prompt": {"prompt": "q", "solution": "x"}, "labelled": {"prompt": "q", "completion": "a", "label": True}}
    paths = refused_everywhere(tmp_path, good[kind], raw, kind, field, "alignlab reads images only")
    assert paths == (4 if kind == "labelled" else 5)  # files, Parquet, a Hub folder, (a stream,) a mixture


def test_an_empty_media_column_is_a_text_row_and_skip_leaves_media_rows_out(tmp_path):
    assert to_canonical({"prompt": "q", "completion": "a", "videos": []}, "sft", "f", 1) == {
        "prompt": [user("q")],
        "completion": "a",
        "videos": [],
    }
    path = write_jsonl(tmp_path / "mixed.jsonl", [{"prompt": "q", "completion": "a"}, MEDIA[0][0]])
    source = FileSource(str(path), eval_fraction=0)
    assert len(source.load("sft", on_bad_row="skip")["train"]) == 1 and source.skipped == {"train": 1}


# -- per-message loss (ms-swift) ------------------------------------------------------------------------
def test_loss_flags_are_read_checked_and_a_false_final_answer_is_cut():
    def sft(messages):
        return to_canonical({"messages": messages}, "sft", "f", 4)

    row = sft([user("a"), assistant("b", loss=False), user("c"), assistant("d")])
    assert row["prompt"][1] == {"role": "assistant", "content": "b", "loss": False} and row["completion"] == "d"
    # the final answer untrained: the conversation ends at the last turn that trains
    row = sft([user("a"), assistant("b", loss=True), user("c"), assistant("d", loss=False)])
    assert row == {"prompt": [user("a")], "completion": "b"}
    # text flags (CSV) read as booleans; null is the default rule
    row = sft([user("a"), assistant("b", loss="false"), user("c"), assistant("d", loss=None)])
    assert row["prompt"][1]["loss"] is False and row["completion"] == "d"
    bad = [
        ([user("a"), assistant("b", loss=False)], "messages", "every assistant turn has loss false"),
        ([user("a"), assistant("b", loss=1)], "messages", "message 1 has loss 1; expected true, false or null"),
        ([user("a", loss=True), assistant("b")], "messages", "message 0 (user) has loss true"),
    ]
    for messages, field, words in bad:
        with pytest.raises(DataError) as err:
            sft(messages)
        assert str(err.value).startswith(f"f, row 4, field '{field}': ") and words in str(err.value)
    # pairs and KTO rows always train their answers; their prompts never carry the flag
    pair = {"messages": [user("a"), assistant("b", loss=False), user("c"), assistant("d")], "rejected_response": "e"}
    assert to_canonical(pair, "pairwise", "f", 1)["prompt"] == [user("a"), assistant("b"), user("c")]
    with pytest.raises(DataError, match=r"field 'messages': the answer \(message 1\) has loss false, but labelled"):
        to_canonical({"messages": [user("a"), assistant("b", loss=False)], "label": True}, "labelled", "f", 1)


def marked_conversation(name):
    """Three earlier assistant turns: one marked false, one unmarked, one marked true."""
    turns = [user("hi"), assistant("Hello!", loss=False), user("12+30="), assistant("42")]
    turns += [user("and 1+1?"), assistant("2", loss=True), user("and 2+2?")]
    return turns if name in SYSTEM_REFUSING else [system("You are terse."), *turns]


@pytest.mark.parametrize("name", CHAT_FAMILIES)
def test_loss_flags_decide_which_earlier_turns_are_trained_in_each_family(family_dir, name):
    tokenizer = load_tokenizer(family_dir(name))
    prompt = marked_conversation(name)
    eot = END_OF_TURN[name]
    ((plain, _),) = encode_conversations(tokenizer, [prompt], [["4"]])
    for default, trained in ((True, ["42", "2"]), (False, ["2"])):
        ((ids, mask, _),) = encode_turns(tokenizer, [prompt], [["4"]], default=default)
        assert ids == plain  # the flags change the mask, never the sequence
        assert [tokenizer.decode(run) for run in stretches(ids, mask, True)] == [t + eot for t in trained]
        assert "Hello!" in "".join(tokenizer.decode(run) for run in stretches(ids, mask, False))


@pytest.mark.parametrize("train_on", ["all_assistant", "last_assistant"])
def test_sft_files_honour_loss_flags_in_every_path(tiny, tmp_path, hub_files, train_on):  # noqa: F811
    rows = [
        {
            "messages": [user("hi"), assistant("NOPE", loss=False), user("2+2="), assistant("OLD"), user("x")]
            + [assistant("YES", loss=True), user("and?"), assistant("LAST")]
        },
        {"messages": [user("q"), assistant("KEEP", loss=True), user("r"), assistant("DROP", loss=False)]},
    ]
    expected = {
        "all_assistant": ["OLD<|im_end|>YES<|im_end|>LAST<|im_end|>", "KEEP<|im_end|>"],
        "last_assistant": ["YES<|im_end|>LAST<|im_end|>", "KEEP<|im_end|>"],
    }[train_on]
    for path, canonical in read_paths(hub_files, rows, "sft").items():
        canonical = canonical if path != "stream" else canonical[:2]
        dm = SFTDataModule(ListSource(canonical), batch_size=2, shuffle=False, max_length=512, train_on=train_on)
        dm.set_tokenizer(tiny[1])
        dm.setup()
        batch = dm.collate(dm.splits["train"], with_prompts=False)
        trained = [tiny[1].decode(ids[mask.bool()]) for ids, mask in zip(batch["input_ids"], batch["loss_mask"])]
        assert trained == expected, path


# -- data.columns suggestions ---------------------------------------------------------------------------
SUGGESTED = [
    ({"query": "2+2=", "response": "4"}, "sft", "completion", "data.columns={query:prompt,response:completion}"),
    ({"question": "2+2=", "answer": "4"}, "prompt", "messages", "data.columns={question:prompt,answer:solution}"),
    (
        {"context": "2+2=", "answer_w": "4", "answer_l": "5"},
        "pairwise",
        "chosen",
        "data.columns={context:prompt,answer_w:chosen,answer_l:rejected}",
    ),
    (
        {"prompt": "2+2=", "chosen": "4", "rejected_response": "5"},
        "pairwise",
        "rejected",
        "{rejected_response:rejected}",
    ),
    (
        {"query": "2+2=", "response": "5", "kto_tag": False},
        "labelled",
        "label",
        "{query:prompt,response:completion,kto_tag:label}",
    ),
]


@pytest.mark.parametrize(("raw", "kind", "field", "override"), SUGGESTED)
def test_a_row_under_other_names_is_told_the_data_columns_map(tmp_path, raw, kind, field, override):
    path = write_jsonl(tmp_path / "rows.jsonl", [raw])
    with pytest.raises(DataError) as err:
        FileSource(str(path)).load(kind)
    text = str(err.value)
    assert text.startswith(f"{path}, row 1, field '{field}': ") and override in text, text
    columns = dict(pair.split(":") for pair in override.split("{")[1].rstrip("}").split(","))
    assert FileSource(str(path), eval_fraction=0).load(kind, columns=columns)["train"]  # the map reads it


def test_a_suggested_map_keeps_the_map_already_given(tmp_path):
    path = write_jsonl(tmp_path / "rows.jsonl", [{"query": "2+2=", "response": "4"}])
    with pytest.raises(
        DataError, match=r"to read `response` as `completion`, add data.columns=\{query:prompt,response:completion\};"
    ):
        FileSource(str(path)).load("sft", columns={"query": "prompt"})


def test_no_map_is_suggested_for_columns_alignlab_already_reads_or_struct_columns():
    assert suggest_columns({"prompt": "q", "answer": "a"}, "sft") == {"answer": "completion"}
    assert suggest_columns({"text": "hello"}, "sft") == {}
    assert suggest_columns({"input": {"messages": []}, "output": "a"}, "sft") == {"output": "completion"}
    assert suggest_columns({"instruction": "q"}, "sft", present=["prompt"]) == {}
