"""The digits demo's data: real handwritten digits with no download.

scikit-learn's bundled handwritten digits (1,797 real 8×8 images) are split once into train and
held-out digits, then rendered as RGB images of `IMAGE_SIZE`×`IMAGE_SIZE`:

- single digits, captioned with `SINGLE_TEMPLATES` ("a photo of the number seven."), for stage 1
  and zero-shot classification;
- *pairs*, two digits side by side ("a 3 on the left and a 7 on the right"), for stage 2
  retrieval, where word order and position matter.

Every digit is drawn as the same `GLYPH`×`GLYPH` glyph: centred for a single, in the left or right
half for a pair, so a digit looks alike in both. Pairs are composed only from digits of their own
split, so no held-out digit is ever seen in training.

The ``demo:`` data specs (``demo:digits``, ``demo:digit_pairs``) are read from here by
`tinyclip_ds.data.sources`, and the demo teacher is trained on the train split by
`tinyclip_ds.demo.teacher`. The module lives in the data layer, not in `tinyclip_ds.demo`,
because it is a data source like any other (it needs numpy, PIL and scikit-learn, nothing
above ``data/``): every reader of a spec (training, evaluation, ``tinyclip-ds eval``,
``prepare``) reads ``demo:`` specs with no registration step, and the data layer never imports
the demo package, whose teacher depends on the models.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Literal

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

DIGIT_NAMES: list[str] = ["zero", "one", "two", "three", "four",
                          "five", "six", "seven", "eight", "nine"]

SINGLE_TEMPLATES: list[str] = [
    "a photo of the number {}.",
    "a handwritten {}.",
    "the digit {}.",
    "a drawing of the number {}.",
    "a picture of a handwritten {}.",
    "an image of the digit {}.",
    "a blurry photo of the number {}.",
    "a small {}.",
]

IMAGE_SIZE = 32
GLYPH = 16  # each 8×8 digit is upscaled to this size; two glyphs fill the width of a pair
NUM_TRAIN_PAIRS = 10_000

Split = Literal["train", "heldout"]


def pair_caption(left: int, right: int) -> str:
    """Caption of a pair image: ``pair_caption(3, 7) == "a 3 on the left and a 7 on the right"``."""
    return f"a {left} on the left and a {right} on the right"


def single_captions() -> list[str]:
    """Every template filled with every digit name (template-major order)."""
    return [template.format(name) for template in SINGLE_TEMPLATES for name in DIGIT_NAMES]


def digit_split(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Indices ``(train, heldout)`` into ``load_digits()``: a stratified 80/20 split, sorted.

    Everything else (singles, pairs, the teacher's training data) is built from this one split.
    """
    labels = _digits()[1]
    train, heldout = train_test_split(np.arange(len(labels)), test_size=0.2,
                                      stratify=labels, random_state=seed)
    return np.sort(train), np.sort(heldout)


def digit_images(split: Split) -> list[tuple[Image.Image, int]]:
    """Single digits of a split as RGB `IMAGE_SIZE`² images (glyph centred), with their labels."""
    glyphs, labels = _split_glyphs(split)
    offset = (IMAGE_SIZE - GLYPH) // 2
    images = []
    for glyph, label in zip(glyphs, labels):
        canvas = np.zeros((IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint8)
        canvas[offset:offset + GLYPH, offset:offset + GLYPH] = glyph
        images.append((_to_rgb(canvas), int(label)))
    return images


def digit_pairs(split: Split) -> list[tuple[Image.Image, str]]:
    """Pairs of digits side by side, with `pair_caption`.

    ``"heldout"``: exactly 100 images, one per ordered (left, right) pair in 0–9 × 0–9, in
    row-major order, composed deterministically from held-out digits (unique captions: a clean
    retrieval set). ``"train"``: `NUM_TRAIN_PAIRS` images drawn with a fixed seed from training
    digits only.
    """
    glyphs, labels = _split_glyphs(split)
    if split == "heldout":
        by_class = [np.flatnonzero(labels == digit) for digit in range(10)]
        # vary which instance is used so that the 100 images show many different handwritings
        picks = [(by_class[left][right % len(by_class[left])],
                  by_class[right][(left + 5) % len(by_class[right])])
                 for left in range(10) for right in range(10)]
    else:
        rng = np.random.default_rng(0)
        picks = rng.integers(0, len(labels), size=(NUM_TRAIN_PAIRS, 2)).tolist()
    pairs = []
    for left, right in picks:
        pairs.append((_compose_pair(glyphs[left], glyphs[right]),
                      pair_caption(int(labels[left]), int(labels[right]))))
    return pairs


@lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray]:
    """All digits as `GLYPH`² uint8 glyphs (white on black) and their labels."""
    data = load_digits()
    glyphs = np.stack([
        np.asarray(Image.fromarray((image * 255 / 16).round().astype(np.uint8))
                   .resize((GLYPH, GLYPH), Image.BILINEAR))
        for image in data.images])
    return glyphs, data.target


def _split_glyphs(split: Split) -> tuple[np.ndarray, np.ndarray]:
    if split not in ("train", "heldout"):
        raise ValueError(f"unknown digits split '{split}'; use 'train' or 'heldout'")
    glyphs, labels = _digits()
    indices = digit_split()[0 if split == "train" else 1]
    return glyphs[indices], labels[indices]


def _compose_pair(left: np.ndarray, right: np.ndarray) -> Image.Image:
    canvas = np.zeros((IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint8)
    top = (IMAGE_SIZE - GLYPH) // 2
    canvas[top:top + GLYPH, :GLYPH] = left
    canvas[top:top + GLYPH, IMAGE_SIZE - GLYPH:] = right
    return _to_rgb(canvas)


def _to_rgb(gray: np.ndarray) -> Image.Image:
    return Image.fromarray(gray).convert("RGB")
