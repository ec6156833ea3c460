"""The digits demo: real data with no download, a word-level tokenizer and a small CLIP teacher.

scikit-learn's bundled handwritten digits (1,797 real 8×8 images) are split once into train and
held-out digits, then rendered as RGB images of `IMAGE_SIZE`×`IMAGE_SIZE`:

- single digits, captioned with `SINGLE_TEMPLATES` ("a photo of the number seven."), for stage 1
  and zero-shot classification;
- *pairs*, two digits side by side ("a 3 on the left and a 7 on the right"), for stage 2
  retrieval, where word order and position matter.

Every digit is drawn as the same `GLYPH`×`GLYPH` glyph: centred for a single, in the left or right
half for a pair, so a digit looks alike in both. Pairs are composed only from digits of their own
split, so no held-out digit is ever seen in training.

The teacher (`load_digits_teacher`) is a `Clip` trained by `tinyclip_ds.data.digits_teacher` on the
train split and shipped as ``digits_teacher.safetensors`` next to this file.
"""

from __future__ import annotations

import json
import re
from functools import lru_cache
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from tinyclip_ds.models.transformer import Clip, TowerShape

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
TEACHER_PATH = Path(__file__).with_name("digits_teacher.safetensors")

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


class DigitsTokenizer:
    """Word-level tokenizer over the demo's vocabulary.

    Ids: 0 pad, 1 start, 2 end-of-text, 3 unknown, then the sorted words of the templates, digit
    names, numerals and pair captions. Text is lowercased and punctuation becomes a space. A call
    returns ``[start, words…, eot, pad…]`` per text, truncated to keep the eot.
    """

    pad_token_id = 0
    start_token_id = 1
    eot_token_id = 2
    unknown_token_id = 3

    def __init__(self, context_length: int = 16):
        if context_length < 2:
            raise ValueError(f"context_length must be at least 2 (start and end tokens), "
                             f"got {context_length}")
        self.context_length = context_length
        words = {word for text in single_captions() + [pair_caption(0, 0)] for word in _words(text)}
        words |= {str(digit) for digit in range(10)}
        self.vocab = ["<pad>", "<start>", "<end>", "<unk>"] + sorted(words)
        self.ids = {word: i for i, word in enumerate(self.vocab)}

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def encode(self, text: str) -> list[int]:
        """Ids of the words of one text, without start, end or padding."""
        return [self.ids.get(word, self.unknown_token_id) for word in _words(text)]

    def __call__(self, texts: list[str]) -> torch.Tensor:
        """Token ids ``(len(texts), context_length)``: start, words, eot, then zero padding."""
        out = torch.full((len(texts), self.context_length), self.pad_token_id, dtype=torch.long)
        for row, text in enumerate(texts):
            ids = self.encode(text)[:self.context_length - 2]
            tokens = [self.start_token_id, *ids, self.eot_token_id]
            out[row, :len(tokens)] = torch.tensor(tokens)
        return out


def load_digits_teacher(path: str | Path = TEACHER_PATH
                        ) -> tuple[Clip, DigitsTokenizer, tuple[float, float, float], tuple[float, float, float]]:
    """The shipped demo teacher: ``(clip, tokenizer, image_mean, image_std)``, in fp32 eval mode.

    Shapes, logit scale and image normalisation come from the file's metadata.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"digits teacher weights not found at {path}; retrain them with "
                                f"'python -m tinyclip_ds.data.digits_teacher --out {path}'")
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["digits_teacher"])
    tokenizer = DigitsTokenizer(meta["text"]["context_length"])
    if meta["text"]["vocab_size"] != tokenizer.vocab_size:
        raise ValueError(f"{path} was trained with a vocabulary of {meta['text']['vocab_size']} words "
                         f"but DigitsTokenizer now has {tokenizer.vocab_size} (the templates changed); "
                         f"retrain with 'python -m tinyclip_ds.data.digits_teacher'")
    clip = Clip(TowerShape(**meta["vision"]), TowerShape(**meta["text"]), meta["logit_scale"])
    clip.load_state_dict({name: t.float() for name, t in load_file(str(path)).items()})
    return clip.eval(), tokenizer, tuple(meta["image_mean"]), tuple(meta["image_std"])


def _words(text: str) -> list[str]:
    return re.sub(r"[^a-z0-9]+", " ", text.lower()).split()


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
