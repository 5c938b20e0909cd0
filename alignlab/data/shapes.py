"""The bundled visual task: questions about coloured shapes in small generated images, with exact answers.

Each image (56×56 pixels by default) is a 2×2 grid of cells on a white background; a cell is empty or
holds one filled shape (square, circle or triangle) in one saturated colour (red, green, blue, yellow),
centred in the cell. The cells match Qwen2-VL's vision tokens: 14-pixel patches merged 2×2 make one
token per 28×28 cell, so a tiny vision-language model sees each cell as one token. Question types:

- `count`: "How many shapes are there?" → a digit 1-4;
- `colour`: "What colour is the circle?" (only asked when the image holds exactly one circle) → a colour word;
- `colour_count`: "How many red shapes are there?" (only asked when at least one is there) → a digit 1-4.

Each type's answers are equally common: an answer is dealt from a shuffled deck of them, then a random
scene that has it is drawn. Everything, pixels included, follows from a seed; the held-out scenes are
distinct from each other and never appear in training (two scenes are the same when every cell holds
the same shape and colour, whatever the sizes), so held-out exact match measures images the model has
not seen. Rows are alignlab's
canonical multimodal rows: the user message is `<image>` followed by the question, `images` holds the
one PIL image, and `solution` the right answer in every data kind.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

from PIL import Image, ImageDraw

from alignlab.data.arith import task_row
from alignlab.data.rows import IMAGE_PLACEHOLDER, KINDS

SHAPES = ("square", "circle", "triangle")
COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "yellow": (255, 255, 0)}
BACKGROUND = (255, 255, 255)
QUESTIONS = ("count", "colour", "colour_count")
COUNTS = ("1", "2", "3", "4")  # the answers of both counting questions
ANSWERS = {"count": COUNTS, "colour": tuple(COLOURS), "colour_count": COUNTS}
CELL = 28  # pixels of a cell at the default size: one Qwen2-VL vision token (2×2 merged 14-pixel patches)
GRID = 2  # cells per side
MAX_TRIES = 10_000  # scene draws per row before giving up on finding one not used yet


@dataclass(frozen=True)
class Shape:
    """One cell's content: `kind` in SHAPES, `colour` in COLOURS, `size` its side (or diameter) in
    pixels at a 28-pixel cell (scaled with the image)."""

    kind: str
    colour: str
    size: int


@dataclass(frozen=True)
class Problem:
    """A scene and a question about it: `cells` row by row (top-left, top-right, bottom-left,
    bottom-right), None where empty; `question` in QUESTIONS; `subject` the shape kind a `colour`
    question names or the colour a `colour_count` question names (None for `count`)."""

    cells: tuple[Shape | None, ...]
    question: str
    subject: str | None
    answer: str

    @property
    def scene(self) -> tuple[tuple[str, str] | None, ...]:
        """What makes two scenes the same: each cell's (kind, colour), sizes left out."""
        return tuple((s.kind, s.colour) if s else None for s in self.cells)

    @property
    def text(self) -> str:
        if self.question == "count":
            return "How many shapes are there?"
        if self.question == "colour":
            return f"What colour is the {self.subject}?"
        return f"How many {self.subject} shapes are there?"

    def wrong_answers(self) -> list[str]:
        """The other answers of the same question type."""
        return [a for a in ANSWERS[self.question] if a != self.answer]


def draw(cells: Sequence[Shape | None], image_size: int = GRID * CELL) -> Image.Image:
    """The scene as an RGB image of image_size × image_size pixels (image_size a multiple of 28):
    cells of image_size / 2 pixels, each shape filled and centred in its cell, drawn without
    anti-aliasing (so every pixel is the background or one of COLOURS, the same on every run)."""
    image = Image.new("RGB", (image_size, image_size), BACKGROUND)
    pen = ImageDraw.Draw(image)
    cell = image_size // GRID
    for i, shape in enumerate(cells):
        if shape is None:
            continue
        side = round(shape.size * cell / CELL)
        left = (i % GRID) * cell + (cell - side) // 2
        top = (i // GRID) * cell + (cell - side) // 2
        right, bottom = left + side - 1, top + side - 1  # PIL's boxes include their last pixel
        fill = COLOURS[shape.colour]
        if shape.kind == "square":
            pen.rectangle((left, top, right, bottom), fill=fill)
        elif shape.kind == "circle":
            pen.ellipse((left, top, right, bottom), fill=fill)
        else:  # an upright triangle: base along the bottom of the box, apex at its top centre
            pen.polygon([(left, bottom), (right, bottom), ((left + right) // 2, top)], fill=fill)
    return image


class ShapesTask:
    """Questions about shapes in generated images (see the module docstring); rejected and undesirable
    answers are another answer of the same question type (another digit, another colour).

    Args:
        seed: fixes every scene, question, size and wrong answer.
        n_train, n_eval: rows per split; held-out scenes are all different and none is a training scene.
            Training scenes may repeat (few scenes hold a single shape), each with its own question.
        image_size: pixels per side, a multiple of 28 (each of the 2×2 cells is image_size / 2 wide).
        questions: the question types, asked in turn (row i asks questions[i % len(questions)]).
        sizes: the shape sizes drawn from, in pixels at a 28-pixel cell (a square's side, a circle's
            diameter, a triangle's base and height).
        desirable_fraction: share of desirable labelled rows (as ArithTask).

    Raises:
        ValueError: on a setting outside those ranges, or when n_eval is so large that the distinct
            held-out scenes use up every scene for some answer (e.g. the 48 with a single shape).
    """

    name = "shapes"

    def __init__(
        self,
        seed: int = 1234,
        n_train: int = 2000,
        n_eval: int = 128,
        image_size: int = GRID * CELL,
        questions: Sequence[str] = QUESTIONS,
        sizes: Sequence[int] = (18, 20, 22),
        desirable_fraction: float = 0.5,
    ):
        if image_size <= 0 or image_size % CELL:
            raise ValueError(
                f"image_size must be a positive multiple of {CELL} (a vision token a cell), got {image_size}"
            )
        questions, sizes = list(questions), list(sizes)
        if not questions or set(questions) - set(QUESTIONS):
            raise ValueError(f"questions must be a non-empty list of {QUESTIONS}, got {questions}")
        if not sizes or not all(4 <= s <= CELL for s in sizes):
            raise ValueError(f"sizes must be a non-empty list of pixel sizes in 4..{CELL}, got {sizes}")
        if not 0 <= desirable_fraction <= 1:
            raise ValueError(f"desirable_fraction must be in [0, 1], got {desirable_fraction}")
        self.seed, self.n_train, self.n_eval, self.image_size = seed, n_train, n_eval, image_size
        self.questions, self.sizes, self.desirable_fraction = questions, sizes, desirable_fraction

    def _draw_scene(self, rng: random.Random, question: str, answer: str) -> Problem:
        """A random scene where `question` has `answer`: the shapes the answer needs and others that
        keep it true, in random cells."""
        colours, most = list(COLOURS), GRID * GRID
        if question == "count":
            subject = None
            contents = [(rng.choice(SHAPES), rng.choice(colours)) for _ in range(int(answer))]
        elif question == "colour":
            subject = rng.choice(SHAPES)
            others = [k for k in SHAPES if k != subject]  # the asked kind appears exactly once
            contents = [(subject, answer)]
            contents += [(rng.choice(others), rng.choice(colours)) for _ in range(rng.randrange(most))]
        else:  # the asked colour as often as the answer says, then other colours in some of the other cells
            subject, k = rng.choice(colours), int(answer)
            others = [c for c in colours if c != subject]
            contents = [(rng.choice(SHAPES), subject) for _ in range(k)]
            contents += [(rng.choice(SHAPES), rng.choice(others)) for _ in range(rng.randint(0, most - k))]
        cells: list[Shape | None] = [None] * most
        for cell, (kind, colour) in zip(rng.sample(range(most), len(contents)), contents):
            cells[cell] = Shape(kind, colour, rng.choice(self.sizes))
        return Problem(tuple(cells), question, subject, answer)

    def _draw_split(self, rng: random.Random, n: int, refused: set, split: str) -> list[Problem]:
        """n problems whose scenes are not in `refused`; held-out scenes are also added to it, so no
        two held-out rows share a scene. Each question type's answers are dealt from a shuffled deck
        of all its answers, so they are (within one) equally common in any split."""
        problems, decks = [], {q: [] for q in self.questions}
        for i in range(n):
            question = self.questions[i % len(self.questions)]
            if not decks[question]:
                decks[question] = rng.sample(ANSWERS[question], len(ANSWERS[question]))
            answer = decks[question].pop()
            for _ in range(MAX_TRIES):
                problem = self._draw_scene(rng, question, answer)
                if problem.scene not in refused:
                    break
            else:
                raise ValueError(
                    f"n_{split}={n}: no unused scene found for row {i} ({question!r} answered {answer!r}); lower n_eval"
                )
            if split == "eval":
                refused.add(problem.scene)
            problems.append(problem)
        return problems

    def problems(self) -> tuple[list[Problem], list[Problem]]:
        """(train, held-out) problems: the scenes and questions `load` turns into rows, in row order."""
        rng, held_out_scenes = random.Random(self.seed), set()
        held_out = self._draw_split(rng, self.n_eval, held_out_scenes, "eval")
        return self._draw_split(rng, self.n_train, held_out_scenes, "train"), held_out

    def _row(self, problem: Problem, kind: str, rng: random.Random, index: int) -> dict:
        prompt = [{"role": "user", "content": IMAGE_PLACEHOLDER + problem.text}]
        wrong = rng.choice(problem.wrong_answers())
        row = task_row(kind, prompt, problem.answer, wrong, index, self.desirable_fraction)
        return {**row, "images": [draw(problem.cells, self.image_size)]}

    def load(self, kind: str, on_bad_row: str = "error") -> dict[str, list[dict]]:
        """Rows of `kind` for the `train` and `eval` splits, in alignlab's canonical multimodal form
        (generated rows are never bad, so `on_bad_row` changes nothing).

        Raises:
            ValueError: for a kind not in alignlab.data.rows.KINDS.
        """
        if kind not in KINDS:
            raise ValueError(f"unknown data kind {kind!r}; expected one of {KINDS}")
        train, held_out = self.problems()
        rng = random.Random(self.seed + 1)
        return {
            "train": [self._row(p, kind, rng, i) for i, p in enumerate(train)],
            "eval": [self._row(p, kind, rng, i) for i, p in enumerate(held_out)],
        }

    def describe(self) -> str:
        return (
            f"bundled shapes (seed {self.seed}, {self.image_size}x{self.image_size} images, "
            f"questions {', '.join(self.questions)})"
        )
