"""Streaming (`data.source.streaming=true`): rows read lazily through `datasets`, shuffled with a
buffer, cut into the same global batches and step totals as the in-memory order, and resumed exactly
from a saved position; what it cannot do is refused naming the key."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from alignlab.data import PairwiseDataModule, PromptDataModule, SFTDataModule
from alignlab.data.files import FileSource
from alignlab.data.streaming import check_streaming
from alignlab.errors import ConfigError, DataError
from tests.data.folders import pairs, write_jsonl, write_uf_folder


def sft_rows(n: int, start: int = 0) -> list[dict]:
    return [{"prompt": f"{i}+1=", "completion": str(i + 1), "n": i} for i in range(start, start + n)]


@pytest.fixture
def sft_folder(tmp_path):
    """Three JSONL shards of 10, 10 and 7 SFT rows (27 in all)."""
    folder = tmp_path / "sft"
    write_jsonl(folder / "train-00000-of-00003.jsonl", sft_rows(10))
    write_jsonl(folder / "train-00001-of-00003.jsonl", sft_rows(10, 10))
    write_jsonl(folder / "train-00002-of-00003.jsonl", sft_rows(7, 20))
    return folder


def streamed(tiny, path, kind=SFTDataModule, accumulate=1, shuffle=True, **source):
    dm = kind(FileSource(str(path), streaming=True, shuffle_buffer=8, **source), batch_size=4, shuffle=shuffle, seed=3)
    dm.set_tokenizer(tiny[1])
    dm.setup()
    dm._accumulate = accumulate
    return dm


def epoch_batches(dm, loader, stop: int | None = None) -> list[dict]:
    """Batches as training takes them (the position taken off each, as the data module's hook does)."""
    out = []
    for batch in loader:
        dm.order.advance(batch.pop("stream_position"))
        out.append(batch)
        if stop is not None and len(out) == stop:
            break
    return out


def numbers(batches) -> list[list[int]]:
    return [b["index"].tolist() for b in batches]


def test_a_stream_keeps_each_rows_types_and_reads_every_row_once_an_epoch(tiny, sft_folder):
    dm = streamed(tiny, sft_folder, shuffle=False)
    assert dm.splits["train"] == [] and dm.read()["eval"] == []  # nothing held in memory, nothing held out
    loader = dm.train_dataloader()
    first = epoch_batches(dm, loader)
    assert dm.source._origin == {}  # where each encoded row came from is not kept
    assert numbers(first) == [list(range(i, min(i + 4, 27))) for i in range(0, 27, 4)]  # file order, last short
    assert dm.order.state_dict() == {"epoch": 1, "start": 0, "micro": 0}
    rows = [ex for ex in dm.stream.rows(0, 0, False)]
    assert [r["n"] for _, r in rows] == list(range(27)) and isinstance(rows[0][1]["n"], int)


def test_a_shuffled_stream_gives_every_row_once_in_a_new_order_each_epoch(tiny, sft_folder):
    dm = streamed(tiny, sft_folder)
    loader = dm.train_dataloader()
    one, two = epoch_batches(dm, loader), epoch_batches(dm, loader)
    flat = [sorted(sum(numbers(e), [])) for e in (one, two)]
    assert flat == [list(range(27))] * 2  # positions in each epoch's stream
    texts = [[b["input_ids"].tolist() for b in e] for e in (one, two)]
    assert texts[0] != texts[1]  # another order in the second epoch
    again = streamed(tiny, sft_folder)
    assert [b["input_ids"].tolist() for b in epoch_batches(again, again.train_dataloader())] == texts[0]


def test_step_totals_count_every_micro_batch_of_the_step(tiny, sft_folder):
    dm = streamed(tiny, sft_folder, accumulate=3)
    batches = epoch_batches(dm, dm.train_dataloader())
    assert [len(b["index"]) for b in batches] == [4] * 6 + [3]  # steps of 12, 12 and 3 rows
    for step in (batches[0:3], batches[3:6], batches[6:]):
        tokens = sum(int(b["loss_mask"][:, 1:].sum()) for b in step)  # scored_tokens, summed
        totals = step[0]["step_totals"]
        assert all(b["step_totals"] == totals for b in step)
        assert totals == {"rows": sum(len(b["index"]) for b in step), "completion_tokens": tokens}


@pytest.mark.parametrize("accumulate, stop", [(1, 3), (2, 3), (2, 4)], ids=["step", "mid-step", "step-end"])
def test_a_saved_position_resumes_exactly_where_training_stopped(tiny, sft_folder, accumulate, stop):
    dm = streamed(tiny, sft_folder, accumulate=accumulate)
    loader = dm.train_dataloader()
    straight = epoch_batches(dm, loader) + epoch_batches(dm, loader)

    first = streamed(tiny, sft_folder, accumulate=accumulate)
    head = epoch_batches(first, first.train_dataloader(), stop=stop)
    state = first.order.state_dict()  # what a checkpoint holds
    resumed = streamed(tiny, sft_folder, accumulate=accumulate)
    loader = resumed.train_dataloader()
    loader.load_state_dict(state)
    tail = epoch_batches(resumed, loader) + epoch_batches(resumed, loader)
    assert len(head) + len(tail) == len(straight)
    for a, b in zip(straight, head + tail):
        assert a.keys() == b.keys()
        for key in a:
            if torch.is_tensor(a[key]):
                assert torch.equal(a[key], b[key]), key
            else:
                assert a[key] == b[key], key


def test_pairwise_and_prompt_streams_and_a_sample_is_the_streams_first_rows(tiny, tmp_path):
    folder = write_uf_folder(tmp_path / "uf", n_train=20, n_test=4)
    dm = streamed(tiny, folder, kind=PairwiseDataModule, shuffle=False, split="train_prefs", eval_split="test_prefs")
    assert len(dm.splits["eval"]) == 4  # a held-out split is read whole
    batches = epoch_batches(dm, dm.train_dataloader())
    assert sum(len(b["index"]) for b in batches) == 20 and batches[0]["input_ids"].shape[0] == 8  # chosen + rejected
    assert "score_chosen" not in batches[0]  # extra columns stay out of training batches, as in memory
    prompts = streamed(tiny, folder, kind=PromptDataModule, shuffle=False, split="train_prefs", max_rows=9)
    got = epoch_batches(prompts, prompts.train_dataloader())
    assert numbers(got) == [[0, 1, 2, 3], [4, 5, 6, 7]]  # the first 9 rows; a short last batch is dropped (online)
    assert got[0]["columns"]["prompt_id"] == ["id-0-1", "id-1-2", "id-2-3", "id-3-4"]


def test_a_stream_checks_its_first_rows_before_anything_else(tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", [*pairs("p", 2), {"prompt": "x", "chosen": "y"}])
    with pytest.raises(DataError, match=r"pairs\.jsonl, row 3, field 'rejected': missing"):
        FileSource(str(path), streaming=True).load("pairwise")
    source = FileSource(str(path), streaming=True)
    rows = source.load("pairwise", on_bad_row="skip")["train"]
    assert [p for _, p in rows.rows(0, 0, False)] and source.skipped == {"train": 1}
    with pytest.raises(DataError, match=r"has no split 'train'; splits present: \['test_prefs', 'train_prefs'\]"):
        FileSource(str(write_uf_folder(tmp_path / "uf")), streaming=True).load("pairwise")
    with pytest.raises(
        DataError, match=r"data\.source\.columns names \['q'\] but no row of the file has such a column"
    ):
        FileSource(str(path), streaming=True, columns={"q": "prompt"}).load("pairwise")
    with pytest.raises(
        ConfigError, match=r"data\.source\.streaming=true reads sft, pairwise, prompt data, not labelled"
    ):
        FileSource(str(path), streaming=True).load("labelled")


def data_config(**source):
    return OmegaConf.create({"source": {"streaming": True, **source}, "group_by_length": False, "sources": None})


@pytest.mark.parametrize(
    "data, algorithm, kind, message",
    [
        ({}, {}, "labelled", r"data\.source\.streaming=true reads sft, pairwise, prompt data; labelled data \(KTO\)"),
        ({"shuffle_buffer": 0}, {}, "sft", r"data\.source\.shuffle_buffer must be a whole number >= 1, got 0"),
        ({"group_by_length": True}, {}, "sft", r"data\.group_by_length=true sorts rows by length.*=false"),
        ({"sources": [{"path": "a"}]}, {}, "pairwise", r"data\.sources \(a mixture\) is read in memory"),
        ({}, {"precompute_ref_log_probs": True}, "pairwise", r"algorithm\.precompute_ref_log_probs=true .*=false"),
        ({}, {"dynamic_sample": True}, "prompt", r"algorithm\.dynamic_sample=true draws replacement prompts"),
    ],
)
def test_what_streaming_cannot_do_is_refused_naming_the_key(data, algorithm, kind, message):
    cfg = data_config()
    if "shuffle_buffer" in data:
        cfg.source.shuffle_buffer = data["shuffle_buffer"]
    cfg.group_by_length = data.get("group_by_length", False)
    cfg.sources = data.get("sources")
    with pytest.raises(ConfigError, match=message):
        check_streaming(cfg, OmegaConf.create(algorithm), kind)
    check_streaming(data_config(streaming=False), OmegaConf.create(algorithm), kind)  # off: nothing to refuse


def test_a_streamed_dpo_run_resumed_after_a_signal_equals_the_straight_run(tmp_path, tiny_model_dir):
    """Through train(): 4 DPO steps straight, and 2 steps, SIGTERM, 2 resumed steps, on a streamed
    Hub-shaped folder (accumulating 2 micro-batches a step): the same weights."""
    from safetensors.torch import load_file

    from alignlab.runner.resume import RunInterrupted
    from alignlab.train import train
    from tests.conftest import QUIET, compose
    from tests.runner.test_resume import interrupter, weights

    folder = write_uf_folder(tmp_path / "uf", n_train=12, n_test=4)
    overrides = [
        "data=custom_pairs",
        f"data.source.path={folder}",
        "data.source.split=train_prefs",
        "data.source.streaming=true",
        "data.source.shuffle_buffer=8",
        "algorithm.precompute_ref_log_probs=false",
        "batch_size=2",
        "trainer.accumulate_grad_batches=2",
        "trainer.max_steps=4",  # 3 steps an epoch: the run crosses into a second, reshuffled epoch
        "save_model=false",
        *QUIET,
    ]
    straight = train(compose(overrides, tmp_path / "straight"))
    assert straight["steps"] == 4
    run = tmp_path / "interrupted"
    with pytest.raises(RunInterrupted, match="stopped on a signal at step 2"):
        train(compose([*overrides, *interrupter(2)], run))
    assert train(compose([*overrides, "resume=auto"], run))["steps"] == 4
    a, b = weights(tmp_path / "straight"), weights(run)
    start = load_file(tiny_model_dir / "model.safetensors")
    assert max((a[f"model.{k}"] - v).abs().max().item() for k, v in start.items()) > 1e-4  # it trained
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-5, atol=1e-6, msg=name)


def test_streamed_sft_and_grpo_train_through_train(tmp_path, sft_folder):
    from alignlab.train import train
    from tests.conftest import QUIET, compose

    stream = [f"data.source.path={sft_folder}", "data.source.streaming=true", "trainer.max_steps=2", *QUIET]
    assert train(compose(["algorithm=sft", "data=custom_sft", *stream], tmp_path / "sft"))["steps"] == 2
    grpo = [
        "algorithm=grpo",
        "data=custom_prompts",
        "algorithm.reward_funcs=[{_target_:alignlab.online.rewards.length_reward,target:4}]",
        "algorithm.max_completion_length=4",
        "algorithm.num_generations=2",
        "batch_size=4",
    ]
    assert train(compose([*grpo, *stream], tmp_path / "grpo"))["steps"] == 2


def test_a_hub_id_streams_through_datasets_and_its_bad_rows_are_named_by_stream_row(hub, tmp_path):
    source = FileSource("someone/ultrafeedback", split="train_prefs", streaming=True, max_rows=7)
    stream = source.load("pairwise")["train"]
    assert hub[-1] == {"path": "someone/ultrafeedback", "name": None, "split": "train_prefs", "streaming": True}
    rows = list(stream.rows(0, 0, shuffle=False))
    assert [p for p, _ in rows] == list(range(7)) and rows[0][1]["score_chosen"] == 8.0
    shuffled = [r["prompt"][0]["content"] for _, r in stream.rows(0, 5, shuffle=True)]
    assert sorted(shuffled) == sorted(r["prompt"][0]["content"] for _, r in rows)  # the same 7 rows, shuffled
    bad = FileSource("someone/ultrafeedback", split="train_prefs", streaming=True, columns={"chosen": "rejected"})
    with pytest.raises(DataError, match=r"someone/ultrafeedback \[train_prefs\], streamed row 1, field 'chosen'"):
        bad.load("pairwise")


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["data.source.max_rows=0"],
            r"^data\.source\.max_rows \(or #N on the path\) must be a whole number >= 1, got 0; give how many train "
            r"rows to sample, or null for all of them$",
        ),
        (["data.source.streaming=true"], r"^algorithm\.precompute_ref_log_probs=true scores every row .*=false$"),
        (["data.source.streaming=true", "data.source.shuffle_buffer=-5"], r"data\.source\.shuffle_buffer must be"),
    ],
)
def test_the_run_checks_refuse_bad_source_options_before_any_model_loads(overrides, message):
    from alignlab.runner.config import check_config
    from tests.conftest import compose

    cfg = compose(["data=custom_pairs", "data.source.path=pairs.jsonl", *overrides])
    with pytest.raises(ConfigError, match=message):
        check_config(cfg)
