"""Pictures of evaluation results, drawn with Pillow alone (no plotting library needed).

`retrieval_grid`: a few captions, each with the images it retrieves best, the correct ones
framed green and the others red; TensorBoard shows it at every evaluation and
``tinyclip-ds eval --plots`` writes it as a PNG file.
"""

from __future__ import annotations

import unicodedata

import torch
from PIL import Image, ImageDraw, ImageFont, ImageOps
from torch import Tensor

THUMB = 96  # thumbnail side, pixels
FRAME = 4  # frame width around each thumbnail
PAD = 8  # space between cells
TEXT_WIDTH = 240  # caption column
LABEL_HEIGHT = 18  # "#1 0.83" line above each thumbnail
TITLE_HEIGHT = 26
FONT_SIZE = 13
CORRECT = (0, 170, 0)
WRONG = (210, 0, 0)
BACKGROUND = (255, 255, 255)
INK = (0, 0, 0)


def chosen_rows(count: int, rows: int) -> list[int]:
    """``rows`` indices spread evenly over ``range(count)``, always starting at 0 (all if fewer)."""
    rows = min(rows, count)
    return [j * count // rows for j in range(rows)]


def row_height() -> int:
    """Height of one caption's row of thumbnails."""
    return LABEL_HEIGHT + THUMB + 2 * FRAME + PAD


def thumbnail_box(row: int, column: int, title: str = "") -> tuple[int, int, int, int]:
    """``(left, top, right, bottom)`` of the framed thumbnail at ``row``, ``column`` (rank - 1) of a
    grid, frame included, right and bottom exclusive."""
    left = PAD + TEXT_WIDTH + PAD + column * (THUMB + 2 * FRAME + PAD)
    top = (TITLE_HEIGHT if title else 0) + PAD + row * row_height() + LABEL_HEIGHT
    return left, top, left + THUMB + 2 * FRAME, top + THUMB + 2 * FRAME


def retrieval_grid(similarity: Tensor, captions: list[str], images: list[Image.Image],
                   correct: list[set[int] | int], rows: int = 4, k: int = 5, title: str = "") -> Image.Image:
    """Caption → image retrieval as a picture: ``rows`` captions (evenly spaced over ``captions``),
    each beside its top-``k`` images by ``similarity`` (``(len(captions), len(images))``), every
    image labelled with its rank and similarity, framed green when it is one of ``correct[i]``
    (an image index or a set of them) and red otherwise."""
    if similarity.shape != (len(captions), len(images)) or len(correct) != len(captions):
        raise ValueError(f"similarity {tuple(similarity.shape)} must be (captions, images) = "
                         f"({len(captions)}, {len(images)}) with one correct entry per caption ({len(correct)})")
    picked = chosen_rows(len(captions), rows)
    k = min(k, len(images))
    font = _font()
    width = thumbnail_box(0, k)[0]
    height = thumbnail_box(len(picked), 0, title)[1] - LABEL_HEIGHT
    grid = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(grid)
    if title:
        draw.text((PAD, PAD // 2), _drawable(title), fill=INK, font=font)
    for row, index in enumerate(picked):
        scores = similarity[index].detach().float().cpu()
        top = torch.topk(scores, k).indices.tolist()
        right = {correct[index]} if isinstance(correct[index], int) else set(correct[index])
        _caption(draw, captions[index], font, thumbnail_box(row, 0, title)[1] - LABEL_HEIGHT,
                 missed=not right & set(top))
        for column, image_index in enumerate(top):
            left, upper, right_edge, lower = thumbnail_box(row, column, title)
            draw.text((left, upper - LABEL_HEIGHT + 2), f"#{column + 1} {scores[image_index]:.2f}", fill=INK, font=font)
            draw.rectangle((left, upper, right_edge - 1, lower - 1),
                           fill=CORRECT if image_index in right else WRONG)
            thumb = ImageOps.contain(images[image_index].convert("RGB"), (THUMB, THUMB))
            cell = Image.new("RGB", (THUMB, THUMB), BACKGROUND)
            cell.paste(thumb, ((THUMB - thumb.width) // 2, (THUMB - thumb.height) // 2))
            grid.paste(cell, (left + FRAME, upper + FRAME))
    return grid


def _caption(draw: ImageDraw.ImageDraw, text: str, font, top: int, missed: bool) -> None:
    """The caption, word-wrapped into the caption column (cut with ... when too long), and a note
    when no correct image is among the shown ones."""
    lines, line = [], ""
    for word in _drawable(text).split():
        candidate = f"{line} {word}".strip()
        if line and draw.textlength(candidate, font=font) > TEXT_WIDTH:
            lines.append(line)
            line = word
        else:
            line = candidate
    lines.append(line)
    fit = (row_height() - PAD) // (FONT_SIZE + 4) - (1 if missed else 0)
    if len(lines) > fit:
        lines = lines[:fit]
        lines[-1] = lines[-1] + " ..."
    if missed:
        lines.append("(correct image not shown)")
    draw.multiline_text((PAD, top + LABEL_HEIGHT), "\n".join(lines), fill=INK, font=font, spacing=4)


PLAIN = str.maketrans({"→": "->", "←": "<-", "–": "-", "—": "-", "‘": "'", "’": "'", "“": '"', "”": '"'})


def _drawable(text: str) -> str:
    """``text`` in ASCII, which is all Pillow's bundled font draws (anything else is an empty box):
    accents dropped (café → cafe), arrows and dashes spelled out, other characters as '?'."""
    decomposed = unicodedata.normalize("NFKD", text.translate(PLAIN))
    plain = "".join(c for c in decomposed if not unicodedata.combining(c))
    return plain.encode("ascii", "replace").decode("ascii")


def _font():
    """Pillow's bundled scalable font (Pillow ≥ 10.1), else its small bitmap font."""
    try:
        return ImageFont.load_default(size=FONT_SIZE)
    except TypeError:
        return ImageFont.load_default()
