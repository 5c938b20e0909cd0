"""The bundled visual task: deterministic images, canonical multimodal rows, answers that are right by
the generator's own scene and by the pixels, and held-out scenes never seen in training."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from alignlab.data.rows import KINDS
from alignlab.data.shapes import ANSWERS, BACKGROUND, COLOURS, QUESTIONS, Shape, ShapesTask, draw
from alignlab.data.vision import IMAGE_PLACEHOLDER

SMALL = {"seed": 3, "n_train": 120, "n_eval": 30}
KEYS = {
    "prompt": {"prompt", "images", "solution"},
    "sft": {"prompt", "completion", "images", "solution"},
    "pairwise": {"prompt", "chosen", "rejected", "images", "solution"},
    "labelled": {"prompt", "completion", "label", "images", "solution"},
}


def pixels(rows: list[dict]) -> list[bytes]:
    return [r["images"][0].tobytes() for r in rows]


def answer(question: str, subject: str | None, cells: list[tuple[str, str] | None]) -> str:
    """The answer recomputed from a scene's (kind, colour) cells."""
    shapes = [c for c in cells if c is not None]
    if question == "count":
        return str(len(shapes))
    if question == "colour":
        (colour,) = [colour for kind, colour in shapes if kind == subject]  # asked only about a single one
        return colour
    return str(sum(colour == subject for _, colour in shapes))


def read_cells(image: Image.Image) -> list[tuple[str, str] | None]:
    """Each cell's (kind, colour) read back from the pixels: its one colour, and its kind from how much
    of the shape's bounding box it fills (square 1, circle about π/4, triangle about 1/2)."""
    array, cell = np.asarray(image), image.size[0] // 2
    names = {rgb: name for name, rgb in COLOURS.items()}
    found = []
    for i in range(4):
        block = array[(i // 2) * cell : (i // 2 + 1) * cell, (i % 2) * cell : (i % 2 + 1) * cell]
        ink = (block != BACKGROUND).any(axis=-1)
        if not ink.any():
            found.append(None)
            continue
        (colour,) = np.unique(block[ink], axis=0).tolist()  # one colour, no blended edge pixels
        ys, xs = np.nonzero(ink)
        fill = ink.sum() / ((ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1))
        kind = "square" if fill > 0.97 else "circle" if 0.7 < fill < 0.9 else "triangle" if 0.4 < fill < 0.65 else "?"
        found.append((kind, names[tuple(colour)]))
    return found


def test_the_same_seed_gives_the_same_rows_and_pixels():
    a, b = ShapesTask(**SMALL).load("pairwise"), ShapesTask(**SMALL).load("pairwise")
    strip = [{k: v for k, v in r.items() if k != "images"} for r in a["train"] + a["eval"]]
    assert strip == [{k: v for k, v in r.items() if k != "images"} for r in b["train"] + b["eval"]]
    assert pixels(a["train"] + a["eval"]) == pixels(b["train"] + b["eval"])
    other = ShapesTask(**{**SMALL, "seed": 4}).load("pairwise")
    assert pixels(other["train"]) != pixels(a["train"])


@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_gives_canonical_rows_with_one_image_per_placeholder(kind):
    data = ShapesTask(**SMALL).load(kind)
    assert (len(data["train"]), len(data["eval"])) == (120, 30)
    for row in data["train"] + data["eval"]:
        assert set(row) == KEYS[kind]
        ((message),) = row["prompt"]
        assert message["role"] == "user" and isinstance(message["content"], str)
        assert message["content"].startswith(IMAGE_PLACEHOLDER)
        assert message["content"].count(IMAGE_PLACEHOLDER) == len(row["images"]) == 1
        image = row["images"][0]
        assert isinstance(image, Image.Image) and image.mode == "RGB" and image.size == (56, 56)
        right, wrong_ones = row["solution"], ANSWERS["colour" if "colour is" in message["content"] else "count"]
        assert right in wrong_ones
        if kind == "sft":
            assert row["completion"] == right
        if kind == "pairwise":
            assert row["chosen"] == right != row["rejected"] and row["rejected"] in wrong_ones
        if kind == "labelled":
            assert (row["completion"] == right) == row["label"] and row["completion"] in wrong_ones
    if kind == "labelled":
        assert sum(r["label"] for r in data["train"]) == 60 and sum(r["label"] for r in data["eval"]) == 15


@pytest.mark.parametrize("image_size", [56, 112])
def test_each_answer_is_right_by_the_scene_and_by_the_pixels(image_size):
    task = ShapesTask(**SMALL, image_size=image_size)
    problems = [p for split in task.problems() for p in split]
    rows = [r for split in task.load("prompt").values() for r in split]
    assert {p.question for p in problems} == set(QUESTIONS)
    for problem, row in zip(problems, rows, strict=True):
        assert row["prompt"][0]["content"] == IMAGE_PLACEHOLDER + problem.text
        assert row["solution"] == problem.answer == answer(problem.question, problem.subject, list(problem.scene))
        seen = read_cells(row["images"][0])
        assert seen == list(problem.scene)
        assert answer(problem.question, problem.subject, seen) == row["solution"]
        assert row["images"][0].size == (image_size, image_size)


def test_held_out_scenes_are_distinct_and_never_in_training():
    train, held_out = ShapesTask().problems()
    assert (len(train), len(held_out)) == (2000, 128)
    assert len({p.scene for p in held_out}) == 128
    assert not {p.scene for p in train} & {p.scene for p in held_out}
    # every answer of every question type is (within one) as common as the others
    for split in (train, held_out):
        for question in QUESTIONS:
            counts = [sum(p.question == question and p.answer == a for p in split) for a in ANSWERS[question]]
            assert max(counts) - min(counts) <= 1


def test_shapes_are_centred_in_their_cells():
    image = draw([Shape("square", "red", 20), None, None, Shape("circle", "blue", 18)])
    ink = np.argwhere((np.asarray(image) != BACKGROUND).any(axis=-1))
    top_left, bottom_right = ink[ink.max(axis=1) < 28], ink[ink.min(axis=1) >= 28]
    assert len(top_left) == 400 and [top_left.min(axis=0).tolist(), top_left.max(axis=0).tolist()] == [[4, 4], [23, 23]]
    assert [bottom_right.min(axis=0).tolist(), bottom_right.max(axis=0).tolist()] == [[33, 33], [50, 50]]


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"image_size": 50}, "image_size must be a positive multiple of 28"),
        ({"questions": ["count", "size"]}, "questions must be a non-empty list"),
        ({"sizes": [30]}, "sizes must be a non-empty list"),
        ({"desirable_fraction": 1.5}, r"desirable_fraction must be in \[0, 1\]"),
        ({"questions": ["count"], "n_eval": 250}, "no unused scene found .* lower n_eval"),  # 48 one-shape scenes
    ],
)
def test_bad_settings_are_refused(settings, message):
    with pytest.raises(ValueError, match=message):
        ShapesTask(**settings).problems()
    with pytest.raises(ValueError, match="unknown data kind"):
        ShapesTask().load("pairs")
