"""Multimodal rows: ms-swift's form (`<image>` in the text + an `images` column) and TRL's form (content
parts, images in a column or inline) become the same canonical row, with loaded PIL RGB images; every
bad image or placeholder count is a DataError naming file, row and field."""

from __future__ import annotations

import base64
import io
import json

import pandas as pd
import pytest
from PIL import Image

from alignlab.data.files import FileSource
from alignlab.data.images import ImageError, load_image
from alignlab.data.rows import IMAGE_PLACEHOLDER, KINDS, to_canonical, unpair
from alignlab.errors import DataError

RED, BLUE, GREEN = (255, 0, 0), (0, 0, 255), (0, 160, 0)
QUESTION = "Left, <image>right: which is red?"
PROMPT = [{"role": "user", "content": "<image>" + QUESTION}]  # the canonical prompt of the two-image rows
TEXT = "Left, "  # the text around the two images in the part lists below
REST = "right: which is red?"


def png_bytes(colour, mode="RGB") -> bytes:
    buffer = io.BytesIO()
    image = Image.new("RGB", (4, 3), colour)
    (image.convert(mode) if mode != "RGB" else image).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def pics(tmp_path):
    """Images next to a data file: tmp_path/data/img/{red,blue,green}.png, and the data file's folder."""
    folder = tmp_path / "data"
    (folder / "img").mkdir(parents=True)
    for name, colour in (("red", RED), ("blue", BLUE), ("green", GREEN)):
        (folder / "img" / f"{name}.png").write_bytes(png_bytes(colour))
    return folder


def pixels(image: Image.Image) -> tuple:
    assert isinstance(image, Image.Image) and image.mode == "RGB"
    return image.size, image.tobytes()


def same_images(got: list, colours: list) -> bool:
    return [pixels(i) for i in got] == [((4, 3), bytes(c) * 12) for c in colours]


def user(content):
    return {"role": "user", "content": content}


def assistant(content):
    return {"role": "assistant", "content": content}


def parts(first=None, second=None) -> list[dict]:
    """TRL's content parts of the two-image question; `first`/`second` put an image inline."""
    image = [{"type": "image"}, {"type": "image"}]
    for part, inline in zip(image, (first, second)):
        if inline is not None:
            part["image"] = inline
    return [image[0], {"type": "text", "text": TEXT}, image[1], {"type": "text", "text": REST}]


def forms(folder) -> dict[str, dict]:
    """The same SFT row (a red then a blue image) in every accepted form."""
    red, blue = folder / "img/red.png", folder / "img/blue.png"
    uri = "data:image/png;base64," + base64.b64encode(png_bytes(RED)).decode()
    swift = [user("<image>" + QUESTION), assistant("the left")]
    return {
        "swift messages, absolute paths": {"messages": swift, "images": [str(red), str(blue)]},
        "swift messages, relative paths": {"messages": swift, "images": ["img/red.png", "img/blue.png"]},
        "flat prompt": {"prompt": "<image>" + QUESTION, "completion": "the left", "images": ["img/red.png", blue]},
        "trl parts": {
            "messages": [user(parts()), assistant([{"type": "text", "text": "the left"}])],
            "images": [str(red), str(blue)],
        },
        "trl prompt/completion": {
            "prompt": [user(parts())],
            "completion": [assistant([{"type": "text", "text": "the left"}])],
            "images": [str(red), str(blue)],
        },
        "inline parts": {"messages": [user(parts(str(red), "img/blue.png")), assistant("the left")]},
        "inline and column": {"messages": [user(parts(first=str(red))), assistant("the left")], "images": [blue]},
        "bytes": {"messages": swift, "images": [png_bytes(RED), png_bytes(BLUE)]},
        "hf image dicts": {
            "messages": swift,
            "images": [{"bytes": png_bytes(RED), "path": "gone.png"}, {"bytes": None, "path": str(blue)}],
        },
        "data uri, other modes": {"messages": swift, "images": [uri, png_bytes(BLUE, "RGBA")]},
        "pil images": {"messages": swift, "images": [Image.new("P", (4, 3), RED), Image.new("RGB", (4, 3), BLUE)]},
    }


FORMS = [
    "swift messages, absolute paths",
    "swift messages, relative paths",
    "flat prompt",
    "trl parts",
    "trl prompt/completion",
    "inline parts",
    "inline and column",
    "bytes",
    "hf image dicts",
    "data uri, other modes",
    "pil images",
]


@pytest.mark.parametrize("form", FORMS)
def test_every_form_gives_the_same_canonical_row(pics, form):
    row = to_canonical(forms(pics)[form], "sft", "data/sft.jsonl", 1, base_dir=pics)
    assert IMAGE_PLACEHOLDER == "<image>" and row["prompt"] == PROMPT and row["completion"] == "the left"
    assert same_images(row["images"], [RED, BLUE])
    assert set(row) == {"prompt", "completion", "images"}


def test_forms_list_is_complete(pics):
    assert sorted(FORMS) == sorted(forms(pics))


def test_images_are_loaded_whole_and_files_closed(pics):
    row = to_canonical(forms(pics)["swift messages, relative paths"], "sft", "f.jsonl", 1, base_dir=pics)
    for name in ("red", "blue"):
        (pics / "img" / f"{name}.png").unlink()  # the rows keep their pixels
    assert same_images(row["images"], [RED, BLUE])
    assert all(getattr(image, "fp", None) is None for image in row["images"])


def test_relative_paths_try_the_data_file_folder_then_the_current_directory(pics, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the data file lies in tmp_path/data; data/img/… is found from here
    lines = [
        {"messages": [user("<image>Colour?"), assistant("red")], "images": ["img/red.png"]},  # next to the file
        {"messages": [user("<image>Colour?"), assistant("blue")], "images": "data/img/blue.png"},  # from cwd
    ]
    (pics / "sft.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    rows = FileSource(str(pics / "sft.jsonl"), eval_fraction=0).load("sft")["train"]
    assert [r["completion"] for r in rows] == ["red", "blue"]
    assert same_images(rows[0]["images"], [RED]) and same_images(rows[1]["images"], [BLUE])
    with pytest.raises(ImageError, match="no such file 'img/red.png'; tried .*img/red.png"):
        load_image("img/red.png")  # no data file folder: the current directory only


def test_csv_cells_hold_json_lists(pics):
    frame = pd.DataFrame(
        {
            "messages": [json.dumps([user("<image>" + QUESTION), assistant("the left")])],
            "images": [json.dumps(["img/red.png", "img/blue.png"])],
            "rejected_response": ["the right"],
        }
    )
    frame.to_csv(pics / "pairs.csv", index=False)
    (row,) = FileSource(str(pics / "pairs.csv"), eval_fraction=0).load("pairwise")["train"]
    assert row["prompt"] == PROMPT and (row["chosen"], row["rejected"]) == ("the left", "the right")
    assert same_images(row["images"], [RED, BLUE]) and "rejected_images" not in row


def test_parquet_with_trl_parts_and_image_structs(pics):
    import pyarrow as pa
    import pyarrow.parquet as pq

    # Arrow stores the parts as structs of all their keys (text: null on image parts) and the
    # images as datasets' Image feature does: {bytes, path}.
    table = pa.Table.from_pylist(
        [
            {
                "prompt": [user(parts())],
                "chosen": [assistant([{"type": "text", "text": "the left"}])],
                "rejected": [assistant([{"type": "text", "text": "the right"}])],
                "images": [{"bytes": png_bytes(RED), "path": None}, {"bytes": png_bytes(BLUE), "path": None}],
            }
        ]
    )
    pq.write_table(table, pics / "pairs.parquet")
    (row,) = FileSource(str(pics / "pairs.parquet"), eval_fraction=0).load("pairwise")["train"]
    assert row["prompt"] == PROMPT and (row["chosen"], row["rejected"]) == ("the left", "the right")
    assert same_images(row["images"], [RED, BLUE])


def test_ms_swift_and_trl_pairs_are_identical(pics):
    red, blue, green = (str(pics / f"img/{c}.png") for c in ("red", "blue", "green"))
    swift = {
        "messages": [user("<image>" + QUESTION), assistant("the left")],
        "rejected_response": "the right",
        "images": [red, blue],
        "rejected_images": [blue, green],
        "id": 7,
    }
    trl = {
        "prompt": [user(parts())],
        "chosen": [assistant([{"type": "text", "text": "the left"}])],
        "rejected": [assistant([{"type": "text", "text": "the right"}])],
        "images": [red, blue],
        "rejected_images": [blue, green],
        "id": 7,
    }
    a, b = (to_canonical(raw, "pairwise", "f.jsonl", 1) for raw in (swift, trl))
    for row in (a, b):
        assert same_images(row["images"], [RED, BLUE]) and same_images(row["rejected_images"], [BLUE, GREEN])
    strip = ("images", "rejected_images")
    assert (
        {k: v for k, v in a.items() if k not in strip}
        == {k: v for k, v in b.items() if k not in strip}
        == {
            "prompt": PROMPT,
            "chosen": "the left",
            "rejected": "the right",
            "id": 7,
        }
    )


def test_every_kind_takes_images(pics):
    red, blue = str(pics / "img/red.png"), str(pics / "img/blue.png")
    conversation = [user("<image>Colour?"), assistant("red")]
    prompt = to_canonical({"messages": conversation, "images": [red], "solution": "red"}, "prompt", "f", 1)
    assert prompt["prompt"] == [user("<image>Colour?")] and prompt["solution"] == "red"
    assert same_images(prompt["images"], [RED])
    flat = to_canonical({"prompt": "<image>Colour?", "images": red}, "prompt", "f", 1)
    assert flat["prompt"] == prompt["prompt"] and same_images(flat["images"], [RED])

    labelled = to_canonical({"messages": conversation, "images": [red], "label": True}, "labelled", "f", 1)
    assert (labelled["completion"], labelled["label"]) == ("red", True) and same_images(labelled["images"], [RED])
    flat = to_canonical(
        {
            "prompt": [user([{"type": "image", "image": red}, {"type": "text", "text": "Colour?"}])],
            "completion": "blue",
            "label": "false",
        },
        "labelled",
        "f",
        1,
    )
    assert flat["prompt"] == prompt["prompt"] and flat["label"] is False and same_images(flat["images"], [RED])

    pair = {"messages": conversation, "rejected_response": "blue", "images": [red]}
    row = to_canonical(pair, "pairwise", "f", 1)
    assert same_images(row["images"], [RED]) and "rejected_images" not in row
    chosen, rejected = unpair(row)
    assert (chosen["completion"], rejected["completion"]) == ("red", "blue")
    assert chosen["images"] is rejected["images"] is row["images"]
    row = to_canonical({**pair, "rejected_images": [blue]}, "pairwise", "f", 1)
    chosen, rejected = unpair(row)  # the rejected answer is about another image
    assert same_images(chosen["images"], [RED]) and same_images(rejected["images"], [BLUE])
    assert "rejected_images" not in chosen and "rejected_images" not in rejected

    sft = to_canonical({**pair, "rejected_images": [blue]}, "sft", "f", 1)  # SFT reads a pair's chosen answer
    assert set(sft) == {"prompt", "completion", "images"} and same_images(sft["images"], [RED])


@pytest.mark.parametrize("kind", KINDS)
def test_text_rows_are_unchanged(kind):
    """No images column and no image part: `<image>` is text; a null or empty column with no
    placeholder is a text row too; text-only content parts are joined into the text."""
    base = {"prompt": "What does <image> mean?", "completion": "a tag", "chosen": "a tag", "rejected": "no"}
    base["label"] = True
    literal = to_canonical(base, kind, "f", 1)
    assert literal["prompt"] == [user("What does <image> mean?")] and "images" not in literal
    for images in (None, [], ""):
        row = to_canonical({**base, "prompt": "Hi", "images": images, "rejected_images": None}, kind, "f", 1)
        assert row == to_canonical({**base, "prompt": "Hi"}, kind, "f", 1) and "images" not in row
    texts = [{"type": "text", "text": "What does "}, {"type": "text", "text": "<image> mean?"}]
    assert to_canonical({**base, "prompt": [user(texts)]}, kind, "f", 1) == literal


def bad_rows(folder) -> list:
    """(raw row, kind, field, phrases of the message) for every image error."""
    (folder / "img/broken.png").write_bytes(b"not a png")
    red, blue = str(folder / "img/red.png"), str(folder / "img/blue.png")
    chat = [user("<image>Colour?"), assistant("red")]
    inline = [user([{"type": "image", "image": "img/none.png"}, {"type": "text", "text": "Colour?"}]), assistant("r")]
    return [
        (
            {"messages": chat, "images": ["img/none.png"]},
            "sft",
            "images",
            ["image 0", "no such file 'img/none.png'", f"tried {folder / 'img/none.png'}, "],
        ),
        (
            {"messages": chat, "images": ["img/broken.png"]},
            "sft",
            "images",
            ["broken.png", "cannot be read as an image", "UnidentifiedImageError"],
        ),
        ({"messages": chat, "images": ["https://example.com/a.png"]}, "sft", "images", ["is a URL", "download them"]),
        ({"messages": chat, "images": [5]}, "sft", "images", ["expected a file path", "got int"]),
        ({"messages": chat, "images": ["data:image/png;base64,@@"]}, "sft", "images", ["base64"]),
        ({"messages": chat, "images": '["img/red.png"'}, "sft", "images", ["not JSON"]),
        ({"messages": chat, "images": [red, blue]}, "sft", "images", ["hold 1 <image> placeholders", "gives 2 images"]),
        ({"prompt": "Colour?", "images": [red]}, "prompt", "images", ["hold 0", "gives 1 images"]),
        ({"prompt": "<image><image>?", "images": None}, "prompt", "images", ["hold 2", "gives 0 images"]),
        (
            {
                "messages": [user([{"type": "image"}, {"type": "text", "text": "Colour?"}]), assistant("red")],
                "label": True,
            },
            "labelled",
            "messages",
            ["hold 1", "gives 0 images (it has no `images` column)"],
        ),
        ({"messages": inline}, "sft", "messages", ["the image in message 0", "no such file"]),
        (
            {"messages": [user([{"type": "video"}])]},
            "prompt",
            "messages",
            ["message 0 part 0 is a video part", "images only"],
        ),
        (
            {"prompt": "<image>?", "completion": [assistant([{"type": "image"}])], "images": [red]},
            "sft",
            "completion",
            ["message 0 (assistant) has an image part"],
        ),
        ({"prompt": "<image>?", "completion": "<image>", "images": [red]}, "sft", "completion", ["the answer holds"]),
        (
            {"messages": chat, "rejected_response": "blue", "images": [red], "rejected_images": [red, blue]},
            "pairwise",
            "rejected_images",
            ["gives 2 images where the prompt holds 1"],
        ),
        (
            {"messages": chat, "rejected_response": "blue", "images": [red], "rejected_images": ["img/none.png"]},
            "pairwise",
            "rejected_images",
            ["image 0", "no such file"],
        ),
    ]


def test_every_image_error_names_file_row_and_field(pics):
    for raw, kind, field, phrases in bad_rows(pics):
        with pytest.raises(DataError) as caught:
            to_canonical(raw, kind, "data/rows.jsonl", 3, base_dir=pics)
        message = str(caught.value)
        assert message.startswith(f"data/rows.jsonl, row 3, field '{field}': "), message
        assert all(phrase in message for phrase in phrases), (message, phrases)


def test_bad_image_rows_are_skipped_on_request(pics):
    good = {"messages": [user("<image>Colour?"), assistant("red")], "images": ["img/red.png"]}
    lines = [good, {**good, "images": ["img/none.png"]}, {**good, "images": []}, {**good, "images": "http://x/a.png"}]
    (pics / "sft.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    source = FileSource(str(pics / "sft.jsonl"), eval_fraction=0)
    with pytest.raises(DataError, match=r"sft.jsonl, row 2, field 'images': image 0: no such file"):
        source.load("sft")
    (row,) = source.load("sft", on_bad_row="skip")["train"]
    assert same_images(row["images"], [RED]) and source.skipped == {"train": 3}
