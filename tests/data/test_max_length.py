"""max_length=auto (the custom data configs' default): the length the rows need, at most the model's
positions, said once; an explicit max_length past the model's positions is warned about."""

from __future__ import annotations

import json
import logging
from types import SimpleNamespace

import pytest

from alignlab.data import LabelledDataModule, PairwiseDataModule, PromptDataModule, SFTDataModule
from alignlab.data.files import FileSource
from alignlab.data.truncation import auto_max_length, model_positions
from alignlab.errors import ConfigError
from tests.conftest import CONF, ListSource


def test_auto_max_length_covers_95_percent_rounded_up_and_capped():
    lengths = list(range(1, 101))  # the 95th of 100 sorted lengths is 95
    assert auto_max_length(lengths, None) == (128, 95)
    assert auto_max_length(lengths, 100) == (100, 95)  # never past the model's positions
    assert auto_max_length([10] * 19 + [5000], None) == (64, 10)  # one outlier in 20 does not set it
    assert auto_max_length([1], None) == (64, 1)
    with pytest.raises(ValueError, match="at least one row"):
        auto_max_length([], 512)


def test_model_positions_from_each_config_spelling():
    assert model_positions(SimpleNamespace(max_position_embeddings=512)) == 512
    assert model_positions(SimpleNamespace(n_positions=1024)) == 1024  # GPT-2
    assert model_positions(SimpleNamespace(text_config=SimpleNamespace(max_position_embeddings=4096))) == 4096
    assert model_positions(SimpleNamespace()) is None


def text_of(tokens: int) -> str:
    return "x" * tokens  # one token per byte on the embedded tokenizer


COLUMNS = {
    "sft": ("prompt", "completion"),
    "pairwise": ("prompt", "chosen", "rejected"),
    "labelled": ("prompt", "completion", "label"),
    "prompt": ("prompt",),
}


def kind_rows(kind: str) -> list[dict]:
    """20 rows of `kind` whose answers grow by 4 tokens a row (10 to 82), and one of 5000 tokens."""
    rows = []
    for i in range(20):
        answer = text_of(5000 if i == 19 else 10 + 4 * i)
        prompt = [{"role": "user", "content": f"question {i}"}]
        row = {"prompt": prompt, "completion": answer, "chosen": answer, "rejected": "!" + answer, "label": i % 2 == 0}
        rows.append({k: row[k] for k in COLUMNS[kind]})
    return rows


MODULES = [SFTDataModule, PairwiseDataModule, LabelledDataModule, PromptDataModule]


@pytest.mark.parametrize("module", MODULES, ids=[m.kind for m in MODULES])
def test_auto_is_what_95_percent_of_the_rows_need_and_is_said_once(tiny, module, caplog):
    _, tokenizer = tiny
    dm = module(ListSource(kind_rows(module.kind)), batch_size=2, max_length="auto")
    dm.set_tokenizer(tokenizer)
    dm.set_max_positions(512)
    with caplog.at_level(logging.INFO, logger="alignlab.data.datamodule"):
        dm.setup()
    (said,) = [r.getMessage() for r in caplog.records if "max_length=auto" in r.getMessage()]
    needed = int(said.split("need at most ")[1].split(" ")[0])
    assert len(dm.splits["train"]) == 20 and dm.dropped["train"] == 0  # the outlier's answer is cut, not dropped
    if module.kind == "prompt":  # the prompt and one generated token
        assert needed < 64 and dm.max_length == 64 and "20 of them fit whole" in said
    else:  # the 19th shortest of 20 rows: its 82-token answer (83 rejected) after the prompt
        assert 82 < needed <= 128 and dm.max_length == 128 and "19 of them fit whole" in said
    assert said.startswith(f"max_length=auto: {dm.max_length} tokens; 95% of the 20 train rows need at most")


def test_auto_is_capped_at_the_models_positions_with_a_warning(tiny, caplog):
    _, tokenizer = tiny
    dm = SFTDataModule(ListSource(kind_rows("sft")), batch_size=2, max_length="auto")
    dm.set_tokenizer(tokenizer)
    dm.set_max_positions(48)
    with caplog.at_level(logging.INFO, logger="alignlab.data.datamodule"):
        dm.setup()
    assert dm.max_length == 48
    (said,) = [r for r in caplog.records if "max_length=auto" in r.getMessage()]
    assert said.levelno == logging.WARNING and "capped at the model's 48 positions" in said.getMessage()


def test_an_explicit_max_length_past_the_models_positions_is_warned_about(caplog):
    dm = SFTDataModule(ListSource([]), batch_size=2, max_length=4096)
    with caplog.at_level(logging.WARNING, logger="alignlab.data.datamodule"):
        dm.set_max_positions(512)
        assert "max_length=4096 is more than the model's 512 positions" in caplog.text
        caplog.clear()
        SFTDataModule(ListSource([]), max_length=512).set_max_positions(512)
        assert not caplog.records
    with pytest.raises(ConfigError, match="max_length must be >= 2 .* or auto, got 'big'"):
        SFTDataModule(ListSource([]), max_length="big")


def test_a_stream_measures_the_rows_it_read_when_it_opened(tiny, tmp_path, caplog):
    _, tokenizer = tiny
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in kind_rows("pairwise")))
    lengths = {}
    for streaming in (False, True):
        source = FileSource(str(path), eval_fraction=0, streaming=streaming)
        dm = PairwiseDataModule(source, batch_size=2, max_length="auto")
        dm.set_tokenizer(tokenizer)
        with caplog.at_level(logging.INFO, logger="alignlab.data.datamodule"):
            dm.setup()
        lengths[streaming] = dm.max_length
    assert lengths[True] == lengths[False] == 128
    assert "95% of the first 20 streamed rows need" in caplog.text


def test_the_custom_data_configs_default_to_auto_and_the_bundled_ones_keep_128():
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):

        def length(*overrides: str):
            return compose(config_name="train", overrides=list(overrides)).data.max_length

        for data in ("custom_pairs", "custom_sft", "custom_kto", "custom_prompts"):
            assert length(f"data={data}") == "auto", data
        assert length("data=custom_pairs", "max_length=512") == 512  # the documented top-level key still sets it
        assert length("data=custom_pairs", "data.max_length=300") == 300
        for data in ("arith_pairs", "arith_sft", "arith_prompts", "shapes_pairs"):
            assert length(f"data={data}") == 128, data
        assert compose(config_name="train").max_length == 128  # the default job as it was
