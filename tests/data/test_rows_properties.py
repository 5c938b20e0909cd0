"""Property: no row, however malformed, gets past the reader unexplained. Every random row either
becomes a well-formed canonical row of its kind or raises DataError naming the file, the row and
(for a row that is an object) the field."""

from __future__ import annotations

import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from alignlab.data.rows import KINDS, ROLES, to_canonical
from alignlab.errors import DataError

FIELDS = ["prompt", "chosen", "rejected", "completion", "label", "messages", "rejected_response", "margin", "x"]

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),
    st.sampled_from(["", " ", "true", "False", "nan", "[]", '[{"role": "user", "content": "hi"}]', *ROLES]),
)
messages = st.lists(
    st.fixed_dictionaries(
        {},
        optional={
            "role": st.one_of(st.sampled_from(ROLES), scalars),
            "content": st.one_of(st.text(max_size=6), scalars),
        },
    ),
    max_size=4,
)
values = st.recursive(st.one_of(scalars, messages), lambda inner: st.lists(inner, max_size=3), max_leaves=6)
rows = st.one_of(st.dictionaries(st.sampled_from(FIELDS), values, max_size=6), values)


def well_formed(row: dict, kind: str) -> None:
    prompt = row["prompt"]
    assert isinstance(prompt, list) and prompt
    assert all(m["role"] in ROLES and isinstance(m["content"], str) for m in prompt)
    assert all(m["content"].strip() or m["role"] == "system" for m in prompt)  # only a system message may be empty
    assert prompt[-1]["role"] != "assistant"
    answers = {"sft": ["completion"], "labelled": ["completion"], "pairwise": ["chosen", "rejected"], "prompt": []}
    for field in answers[kind]:
        assert isinstance(row[field], str) and row[field].strip()
    if kind == "pairwise":
        assert row["chosen"] != row["rejected"]
        if "margin" in row:
            assert isinstance(row["margin"], float) and math.isfinite(row["margin"])
    if kind == "labelled":
        assert isinstance(row["label"], bool)


@pytest.mark.parametrize("kind", KINDS)
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(raw=rows)
def test_random_rows_become_canonical_or_a_named_error(kind, raw):
    try:
        row = to_canonical(raw, kind, "data/train.jsonl", 7)
    except DataError as e:
        assert str(e).startswith("data/train.jsonl, row 7")
        assert e.field is not None or not isinstance(raw, dict)
        return
    well_formed(row, kind)
