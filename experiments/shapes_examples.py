"""Saves a grid of examples from the bundled visual task: each image (enlarged) with its question and answer.

The picture in docs/data.md ("The bundled visual task") comes from this script with its defaults:

    python experiments/shapes_examples.py --out docs/shapes_examples.png [--n 6] [--split eval] [--seed 1234]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from alignlab.data.shapes import ShapesTask
from alignlab.data.vision import IMAGE_PLACEHOLDER

SCALE = 3  # nearest-neighbour enlargement, so the pixels stay as the model sees them
CAPTION = 36  # pixels under each image for its question and answer
GAP = 6


def examples_grid(rows: list[dict], columns: int) -> Image.Image:
    """One tile per row: its image enlarged SCALE times, the question and its answer under it."""
    side = rows[0]["images"][0].size[0] * SCALE
    width, font = max(side, 230), ImageFont.load_default(size=13)  # room for the longest question on one line
    lines = -(-len(rows) // columns)
    grid = Image.new("RGB", (columns * (width + GAP) + GAP, lines * (side + CAPTION + GAP) + GAP), (200, 200, 200))
    pen = ImageDraw.Draw(grid)
    for i, row in enumerate(rows):
        x, y = GAP + (i % columns) * (width + GAP), GAP + (i // columns) * (side + CAPTION + GAP)
        pen.rectangle((x, y, x + width - 1, y + side + CAPTION - 1), fill=(255, 255, 255))
        grid.paste(row["images"][0].resize((side, side), Image.NEAREST), (x + (width - side) // 2, y))
        question = row["prompt"][0]["content"].replace(IMAGE_PLACEHOLDER, "")
        pen.text((x + 5, y + side + 3), question, fill=(0, 0, 0), font=font)
        pen.text((x + 5, y + side + 19), f"answer: {row['solution']}", fill=(0, 0, 160), font=font)
    return grid


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="the PNG to write")
    parser.add_argument("--n", type=int, default=6, help="examples to show (the first of the split)")
    parser.add_argument("--split", choices=["train", "eval"], default="eval")
    parser.add_argument("--seed", type=int, default=1234, help="the task's seed (conf/data/shapes_*.yaml: 1234)")
    args = parser.parse_args()

    rows = ShapesTask(seed=args.seed).load("prompt")[args.split][: args.n]  # the data configs' rows
    args.out.parent.mkdir(parents=True, exist_ok=True)
    examples_grid(rows, columns=min(len(rows), 3)).save(args.out, optimize=True)
    print(f"wrote {len(rows)} examples to {args.out}")


if __name__ == "__main__":
    main()
