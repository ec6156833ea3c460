"""Map-style datasets for stage 1 (images; captions) and stage 2 (pairs), and their collate.

Training keys are ``(index, sample_seed)`` (from `tinyclip_ds.data.sampler`): all randomness
of a sample — augmentation, which of its captions is used — is drawn from RNGs seeded with
its sample seed, so a sample's tensors depend only on its index and its place in the global
order, never on the worker, the rank or the world size. Evaluation keys are plain indices (no
randomness: the eval transform is deterministic and the first caption is used).

A sample whose image or caption cannot be used comes back as ``{"index": i, "skipped": reason,
"source": spec}`` (``reason`` from `sources.SKIP_REASONS` or `sources.CAPTION_SKIP_REASONS`,
``spec`` the recipe source of the entry);
`collate` drops it and counts it per reason and per source, so training logs it and goes on.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch
from PIL import Image
from torch.utils.data import Dataset

Key = int | tuple[int, int]
"""``(index, sample_seed)`` in training, a plain index in evaluation."""
Transform = Callable[[Image.Image], torch.Tensor]
Tokenizer = Callable[[list[str]], torch.Tensor]
"""Texts in, ``(len(texts), context_length)`` token ids out (the teacher's tokenizer)."""


class ImageSourceLike(Protocol):
    """What the datasets read (`sources.ImageSource`, `mixture.Mixture`)."""

    def __len__(self) -> int: ...
    def load(self, index: int) -> Image.Image | str: ...
    def source_of(self, index: int) -> str: ...


class CaptionSource(Protocol):
    """Samples with captions (`mixture.Mixture`, `sources.PairSource`)."""

    def __len__(self) -> int: ...
    def captions_of(self, index: int) -> list[str] | str: ...
    def source_of(self, index: int) -> str: ...


class PairSourceLike(ImageSourceLike, CaptionSource, Protocol):
    """Images with their captions (`sources.PairSource`, `mixture.Mixture` of pair parts)."""


def _split(key: Key) -> tuple[int, int | None]:
    """``(index, sample_seed)``; the seed is None for a plain evaluation index."""
    if isinstance(key, (tuple, list)):
        return int(key[0]), int(key[1])
    return int(key), None


def _seeded(sample_seed: int | None, draw: Callable[[], torch.Tensor]) -> torch.Tensor:
    """``draw()`` with torch's CPU RNG seeded by ``sample_seed``; the caller's RNG state is kept."""
    if sample_seed is None:
        return draw()
    # The CPU generator only: torch.manual_seed also queues a seed for every CUDA device, and
    # without CUDA initialised each queued call records a stack trace — 40 % of a worker's time
    # per 32-px sample. The CPU draws, and so the tensors, are the same.
    generator = torch.random.default_generator
    state = generator.get_state()
    generator.manual_seed(sample_seed)
    try:
        return draw()
    finally:
        generator.set_state(state)


class ImageDataset(Dataset):
    """Images of a source through a transform -> ``{"index", "image": float (3, S, S)}``.

    With the eval transform and plain-index keys this is also the evaluation dataset of
    `eval_pairs` and `classification_source` images."""

    def __init__(self, source: ImageSourceLike, transform: Transform) -> None:
        self.source = source
        self.transform = transform

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, key: Key) -> dict[str, Any]:
        index, seed = _split(key)
        image = self.source.load(index)
        if isinstance(image, str):
            return {"index": index, "skipped": image, "source": self.source.source_of(index)}
        return {"index": index, "image": _seeded(seed, lambda: self.transform(image))}


class TextDataset(Dataset):
    """Captions, tokenized -> ``{"index", "text": long (ctx,)}``; a sample with several captions
    gives one drawn from the sample seed (the first in evaluation)."""

    def __init__(self, source: CaptionSource | Sequence[str], tokenizer: Tokenizer) -> None:
        self.source = source
        self.tokenizer = tokenizer

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, key: Key) -> dict[str, Any]:
        index, seed = _split(key)
        if isinstance(self.source, Sequence):
            return {"index": index, "text": self.tokenizer([self.source[index]])[0]}
        captions = self.source.captions_of(index)
        if isinstance(captions, str):
            return {"index": index, "skipped": captions, "source": self.source.source_of(index)}
        return {"index": index, "text": self.tokenizer([_choose(captions, seed)])[0]}


class PairDataset(Dataset):
    """Images with one of their captions -> ``{"index", "image", "text"}``; in training the
    caption is drawn from the sample seed (a new one each epoch), in evaluation it is the first."""

    def __init__(self, source: PairSourceLike, transform: Transform, tokenizer: Tokenizer) -> None:
        self.source = source
        self.images = ImageDataset(source, transform)
        self.tokenizer = tokenizer

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, key: Key) -> dict[str, Any]:
        index, seed = _split(key)
        captions = self.source.captions_of(index)  # before the image: a caption is cheaper to check
        if isinstance(captions, str):
            return {"index": index, "skipped": captions, "source": self.source.source_of(index)}
        sample = self.images[key]
        if "skipped" in sample:
            return sample
        return {**sample, "text": self.tokenizer([_choose(captions, seed)])[0]}


def _choose(captions: list[str], seed: int | None) -> str:
    """The first caption in evaluation, one drawn from the sample seed in training."""
    return captions[0] if seed is None else captions[random.Random(seed).randrange(len(captions))]


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack the usable samples: ``{"index": long (B,), "image"?: (B, 3, S, S), "text"?:
    (B, ctx), "skipped": int, "skip_reasons": {reason: n}, "skip_sources": {spec: n}}``; B may
    be 0 when every sample of the micro-batch was skipped."""
    good = [s for s in samples if "skipped" not in s]
    skipped = [s for s in samples if "skipped" in s]
    batch: dict[str, Any] = {"index": torch.tensor([s["index"] for s in good], dtype=torch.long),
                             "skipped": len(skipped),
                             "skip_reasons": dict(Counter(s["skipped"] for s in skipped)),
                             "skip_sources": dict(Counter(s["source"] for s in skipped))}
    for name in ("image", "text"):
        if good and name in good[0]:
            batch[name] = torch.stack([s[name] for s in good])
    return batch
