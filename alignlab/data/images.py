"""One image value of a multimodal row (see `alignlab.data.rows`) as a PIL RGB image, loaded whole.

Accepted values, as the data forms users bring give them:
- a local path: absolute, `~/…`, `file:///…`, or relative (tried next to the data file, then from the
  current directory);
- raw `bytes` of an image file (PNG, JPEG, …);
- a `{"bytes": …, "path": …}` object, as Hugging Face `datasets` Image features and Parquet files give
  them: the bytes when present, else the path;
- a `PIL.Image.Image`;
- a `data:image/<type>;base64,…` URI.
An `http(s)://` (or any other `scheme://`) URL is refused: alignlab reads data offline and never
downloads images.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
import re
from pathlib import Path
from typing import Any

from PIL import Image

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_DATA_URI = re.compile(r"^data:image/[\w.+-]+;base64,", re.IGNORECASE)
ACCEPTED = "a file path, bytes, a {'bytes', 'path'} object, a PIL image or a data:image/...;base64 URI"


class ImageError(ValueError):
    """An image value cannot be loaded; the message says why (the caller adds file, row and field)."""


def describe(value: Any, limit: int = 60) -> str:
    """A short name for an image value in an error message (never a whole data URI or byte string)."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return f"{len(value)} bytes"
    if isinstance(value, Image.Image):
        return "a PIL image"
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def candidates(path: str, base_dir: str | os.PathLike | None = None) -> list[Path]:
    """Where a path may be: itself when absolute, else next to the data file (`base_dir`), then from
    the current directory."""
    given = Path(path).expanduser()
    if given.is_absolute():
        return [given]
    tried = [Path(base_dir) / given] if base_dir is not None else []
    tried.append(Path.cwd() / given)
    return list(dict.fromkeys(tried))


def _rgb(source: Any) -> Image.Image:
    """Open `source` (a path or a file object) and return its pixels as RGB, the file closed.

    `convert` reads the whole image (and drops an alpha channel), so nothing stays lazily tied to a file.
    """
    try:
        with Image.open(source) as image:
            image.load()
            return image.convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        # UnidentifiedImageError (not an image) and truncated files are OSErrors; keep PIL's reason
        raise ImageError(f"cannot be read as an image ({type(e).__name__}: {e})") from None


def _from_data_uri(uri: str) -> Image.Image:
    match = _DATA_URI.match(uri)
    if match is None:
        raise ImageError(f"{describe(uri)} is not a data:image/<type>;base64, URI")
    try:
        data = base64.b64decode("".join(uri[match.end() :].split()), validate=True)  # line breaks are allowed
    except (binascii.Error, ValueError) as e:
        raise ImageError(f"the data URI's base64 text cannot be decoded ({e})") from None
    return _rgb(io.BytesIO(data))


def _from_path(path: str, base_dir: str | os.PathLike | None) -> Image.Image:
    tried = candidates(path, base_dir)
    for place in tried:
        if place.is_file():
            try:
                return _rgb(place)
            except ImageError as e:
                raise ImageError(f"{place}: {e}") from None
    raise ImageError(f"no such file {path!r}; tried {', '.join(map(str, tried))}")


def load_image(value: Any, base_dir: str | os.PathLike | None = None) -> Image.Image:
    """`value` (see the module docstring) as a fully loaded RGB `PIL.Image.Image`.

    Args:
        value: a path, bytes, a `{"bytes", "path"}` object, a PIL image or a base64 data URI.
        base_dir: the folder of the data file the value came from; a relative path is tried there
            first, then from the current directory.

    Raises:
        ImageError: a URL (not downloaded), a missing file (naming every path tried), data that is
            not an image (with PIL's reason), or a value of another type.
    """
    if isinstance(value, Image.Image):
        try:
            value.load()
            return value.convert("RGB")
        except (OSError, ValueError) as e:
            raise ImageError(f"the PIL image cannot be read ({type(e).__name__}: {e})") from None
    if isinstance(value, (bytes, bytearray, memoryview)):
        return _rgb(io.BytesIO(bytes(value)))
    if isinstance(value, dict):  # datasets' Image feature: the bytes win, else the path
        if value.get("bytes") is not None:
            return load_image(value["bytes"], base_dir)
        if value.get("path") is not None:
            return load_image(value["path"], base_dir)
        raise ImageError(f"an image object needs 'bytes' or 'path', got keys {sorted(map(str, value))}")
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if isinstance(value, str):
        text = value.strip()
        if not text:
            raise ImageError("the image path is empty")
        if text[:5].lower() == "data:":
            return _from_data_uri(text)
        if text[:7].lower() == "file://":
            return _from_path(text[7:], base_dir)
        if _URL.match(text):
            raise ImageError(
                f"{describe(text)} is a URL; alignlab does not download images: download them and give local paths"
            )
        return _from_path(text, base_dir)
    raise ImageError(f"expected {ACCEPTED}, got {type(value).__name__}")
