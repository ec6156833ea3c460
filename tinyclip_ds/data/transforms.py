"""CLIP image preprocessing, with geometric-only RandAugment for training.

All randomness comes from torch's global RNG; the datasets seed it per sample (see
`tinyclip_ds.data.datasets`), so an augmented image depends only on its sample seed.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

GEOMETRIC_OPS = ("Identity", "ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate")
"""The RandAugment operations kept: colour operations hurt distillation (they change what the
teacher sees in ways captions do not describe).
No flips either: left and right carry meaning (the digit-pairs captions say which is where)."""


class GeometricRandAugment(T.RandAugment):
    """torchvision's RandAugment with its augmentation space reduced to `GEOMETRIC_OPS`."""

    def _augmentation_space(self, num_bins: int, image_size: tuple[int, int]) -> dict[str, tuple[torch.Tensor, bool]]:
        space = super()._augmentation_space(num_bins, image_size)
        return {name: space[name] for name in GEOMETRIC_OPS}


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode as 8-bit RGB. Integer greyscale (16-bit PNG and TIFF: I;16*, I) keeps its
    top 8 of 16 bits: Pillow's own conversion clips it at 255, which turns almost every pixel
    white. Transparent pixels (RGBA, LA, PA, a palette or colour key with transparency) are
    composited on white, as Hugging Face's CLIP preprocessing does: the colour under alpha 0 is
    often black or noise. Other modes (L, P, CMYK, YCbCr, ...) convert as Pillow does."""
    if image.mode == "I" or image.mode.startswith("I;16"):
        eight_bit = (np.clip(np.asarray(image), 0, 65535) >> 8).astype(np.uint8)
        return Image.fromarray(eight_bit).convert("RGB")
    if image.mode in ("RGBA", "RGBa", "LA", "La", "PA") or "transparency" in image.info:
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, image.convert("RGBA")).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def eval_transform(image_size: int, mean: Sequence[float], std: Sequence[float]) -> T.Compose:
    """CLIP preprocessing: RGB, shorter side resized to ``image_size`` (bicubic), centre crop,
    tensor in [0, 1], normalised with the teacher's ``mean``/``std`` -> float32 (3, S, S)."""
    return T.Compose(_resize_crop(image_size) + _to_normalised_tensor(mean, std))


def train_transform(image_size: int, mean: Sequence[float], std: Sequence[float],
                    randaugment: bool = True, ops: int = 2, magnitude: int = 9) -> T.Compose:
    """`eval_transform` plus, after the crop, RandAugment with geometric operations only
    (``ops`` operations per image at ``magnitude`` of 0-30)."""
    augment = [GeometricRandAugment(num_ops=ops, magnitude=magnitude,
                                    interpolation=InterpolationMode.BILINEAR)] if randaugment else []
    return T.Compose(_resize_crop(image_size) + augment + _to_normalised_tensor(mean, std))


def _resize_crop(image_size: int) -> list:
    return [T.Lambda(to_rgb),
            T.Resize(image_size, interpolation=InterpolationMode.BICUBIC),
            T.CenterCrop(image_size)]


def _to_normalised_tensor(mean: Sequence[float], std: Sequence[float]) -> list:
    return [T.ToTensor(), T.Normalize(mean=list(mean), std=list(std))]
