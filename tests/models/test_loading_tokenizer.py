"""The embedded byte-level tokenizer round-trips every string, as loaded for training and as exported."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from alignlab.models.loading import GENERIC_TOKENIZER_CLASSES, load_tokenizer, tokenizer_from_pretrained
from alignlab.runner.config import compose

# Any Unicode text but lone surrogates, which no UTF-8 byte sequence spells.
TEXT = st.text(st.characters(exclude_categories=["Cs"]), max_size=40)
NFD, NFC = "cafe\u0301", "caf\u00e9"  # the same word: "e" + combining acute accent, and the precomposed "é"


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    """The tokenizer exactly as a run loads it from the embedded model folder."""
    return load_tokenizer(str(tiny_model_dir), compose().model, require_chat_template=True)


@pytest.fixture(scope="module")
def reloaded(loaded, tiny_model_dir, tmp_path_factory):
    """The tokenizer of an exported folder (config.json of a qwen2 model beside the tokenizer files)."""
    folder = tmp_path_factory.mktemp("export")
    shutil.copy(tiny_model_dir / "config.json", folder)
    loaded.save_pretrained(folder)
    return tokenizer_from_pretrained(folder)


def round_trip(tokenizer, text: str) -> str:
    return tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=TEXT)
def test_any_text_encodes_and_decodes_byte_for_byte(loaded, reloaded, text):
    # Text spelling a control token is issue 15's item 4 (encoded as text); here: everything else.
    assume(not any(token in text for token in loaded.all_special_tokens))
    for tokenizer in (loaded, reloaded):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert ids == list(text.encode("utf-8"))  # one id per UTF-8 byte: nothing normalised away
        assert tokenizer.decode(ids) == text


@pytest.mark.parametrize(
    "text",
    [NFD, "\U0001f469\u200d\U0001f4bb", "a\x00b\x1b[0m\r\n\t\x7f\u2028", "\ufb01 \u212b \u00c5", "  two  spaces  "],
    ids=["nfd", "emoji-zwj", "control", "compatibility", "spaces"],
)
def test_examples_round_trip(loaded, reloaded, text):
    assert round_trip(loaded, text) == text
    assert round_trip(reloaded, text) == text


def test_a_pair_differing_only_in_normal_form_stays_two_different_texts(loaded, reloaded):
    for tokenizer in (loaded, reloaded):
        nfd, nfc = (tokenizer(t, add_special_tokens=False)["input_ids"] for t in (NFD, NFC))
        assert nfd == [99, 97, 102, 101, 0xCC, 0x81]  # "e" then the accent's two UTF-8 bytes
        assert nfc == [99, 97, 102, 0xC3, 0xA9]
        assert tokenizer.backend_tokenizer.normalizer is None


def test_the_embedded_and_exported_folders_declare_the_generic_tokenizer(tiny_model_dir, reloaded):
    for folder in (tiny_model_dir, reloaded.name_or_path):
        declared = json.loads((Path(folder) / "tokenizer_config.json").read_text())["tokenizer_class"]
        assert declared in GENERIC_TOKENIZER_CLASSES, folder
