"""A sample's image or captions, decoded, or the reason it cannot be used.

Every reader (`sources`, `shards`, `hf`) and ``tinyclip-ds prepare`` decode through this module,
so a bad file, tar member or dataset cell is named the same way whichever source it came from:
images by a key of `SKIP_REASONS`, captions by a key of `CAPTION_SKIP_REASONS`. Training counts
those names per reason (`datasets.collate`), so they are part of what a run reports. Nothing
here raises for bad data: a reader returns the reason instead of the image or the captions.
"""

from __future__ import annotations

import io
import logging
import os
import stat
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

from PIL import Image, UnidentifiedImageError

log = logging.getLogger(__name__)

ImageEntry = Path | Image.Image
"""An image file (opened when loaded) or an image already in memory (demo data)."""

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
"""What makes a file (or a tar member) an image (compared lower-cased)."""

SKIP_REASONS = {
    "missing_file": "no file at this path (or a symlink whose target is gone)",
    "not_a_file": "the path is a directory or another non-regular file",
    "zero_byte": "the file is empty (an interrupted download or copy?)",
    "unreadable": "the operating system refused to read the file (permissions, I/O error)",
    "not_an_image": "the content is not an image format Pillow knows",
    "truncated": "the image format is recognised but its data is cut short or damaged",
    "too_large": "more pixels than Pillow's decompression-bomb limit (2 x Image.MAX_IMAGE_PIXELS)",
    "missing_shard": "the tar shard holding the sample was deleted or moved after it was indexed",
    "no_image_member": "the tar shard sample has no image member (a caption-only sample)",
    "no_image": "the sample has no image (an empty dataset cell or image path)",
}
"""Why an image cannot be used: the reasons `load_image` and the readers' ``load`` return."""

CAPTION_SKIP_REASONS = {
    "missing_caption": "the sample has no caption (no .txt member, no caption column value)",
    "empty_caption": "the caption is empty or only white space",
    "long_caption": "the caption is longer than data.max_caption_chars (scraped page text, not a caption)",
    "bad_json": "the sample's .json member is not a JSON object with a text \"caption\"",
    "not_utf8": "the caption is not UTF-8 text",
    "missing_shard": "the tar shard holding the sample was deleted or moved after it was indexed",
    "unreadable": "the operating system refused to read the shard (I/O error), or it shrank after indexing",
}
"""Why a caption cannot be used: the reasons `caption_problem` and the readers' ``captions_of`` return."""

_reported: set[str] = set()  # files this process has already warned about


# --------------------------------------------------------------------------- images

def load_image(entry: ImageEntry) -> Image.Image | str:
    """The image, decoded (in its own mode; `transforms.to_rgb` makes it RGB), or the reason it
    cannot be used (a key of `SKIP_REASONS`; warned about once per process). Never raises for
    a bad file."""
    if isinstance(entry, Image.Image):
        return entry
    decoded = _decode(entry)
    if isinstance(decoded, Image.Image):
        return decoded
    reason, detail = decoded
    if str(entry) not in _reported:
        _reported.add(str(entry))
        log.warning("skipping image %s (%s): %s", entry, reason, detail or SKIP_REASONS[reason])
    return reason


def _decode(path: Path) -> Image.Image | tuple[str, str]:
    """The decoded image, or ``(reason, what went wrong)``."""
    try:
        info = os.stat(path)  # before opening: opening a FIFO named like an image would block
        if not stat.S_ISREG(info.st_mode):
            return "not_a_file", ""
        if info.st_size == 0:
            return "zero_byte", ""
        file = open(path, "rb")
    except FileNotFoundError:
        return "missing_file", ""
    except OSError as error:
        return "unreadable", str(error)
    with file:  # closed however decoding ends
        return decode_image_file(file)


def decode_image_bytes(data: bytes) -> Image.Image | tuple[str, str]:
    """An image held in memory (a tar member, a dataset cell), decoded, or ``(reason, detail)``."""
    if not data:
        return "zero_byte", ""
    return decode_image_file(io.BytesIO(data))


def decode_image_file(file: BinaryIO) -> Image.Image | tuple[str, str]:
    """The image in an open binary file, decoded now (so that truncated or corrupt data fails
    here and not in a transform), or ``(reason, detail)`` with a reason of `SKIP_REASONS`."""
    try:
        image = Image.open(file)
        image.load()
        return image
    except Image.DecompressionBombError as error:
        return "too_large", str(error)
    except UnidentifiedImageError:
        return "not_an_image", ""
    except Exception as error:  # noqa: BLE001 - decoders of damaged data raise OSError, SyntaxError, ValueError, ...
        return "truncated", f"{type(error).__name__}: {error}"


# --------------------------------------------------------------------------- captions

def caption_problem(text: str | None, max_chars: int) -> str | None:
    """Why ``text`` cannot be used as a caption (a key of `CAPTION_SKIP_REASONS`), or None."""
    if text is None:
        return "missing_caption"
    stripped = text.strip()
    if not stripped:
        return "empty_caption"
    if len(stripped) > max_chars:
        return "long_caption"
    return None


def usable_captions(texts: Sequence[str | None], max_chars: int) -> list[str] | str:
    """The usable captions of a sample, stripped (at least one), or the reason it has none: the
    first caption's (``missing_caption`` when there is no caption at all). Unusable captions
    beside a usable one are left out, so one bad caption of five does not lose the image."""
    problems = [caption_problem(text, max_chars) for text in texts]
    usable = [text.strip() for text, problem in zip(texts, problems) if problem is None]
    if usable:
        return usable
    return problems[0] if problems else "missing_caption"
