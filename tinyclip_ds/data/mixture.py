"""A stage's training sources, each read by the reader its spec names, mixed into one index space.

A spec (one item of ``data.images`` / ``data.captions`` / ``data.pairs``) is, by its form:

- a webdataset shard set (`tinyclip_ds.data.shards`): a brace pattern
  ``shards/{00000..00099}.tar``, one ``.tar`` file, or a folder of ``.tar`` files;
- a Hugging Face dataset (`tinyclip_ds.data.hf`): a ``save_to_disk`` folder, ``.parquet`` /
  ``.arrow`` files, or an ``imagefolder`` with ``metadata.jsonl`` / ``metadata.csv``;
- otherwise what `tinyclip_ds.data.sources` reads: image folders, caption files, CSV/TSV,
  COCO captions JSON and the demo data (a pairs file also gives stage 1 image its images and
  stage 1 text the captions of a CSV/TSV).

Shard sets and datasets are *paired* sources: stage 1 image reads their images, stage 1 text
their captions, stage 2 both, and a sample missing what the stage needs is left out while
indexing, counted per reason. Every reader is a `Part`; `Mixture` concatenates a stage's parts,
and `order.GlobalOrder` decides how often each is drawn (``data.weights``).
"""

from __future__ import annotations

import bisect
import dataclasses
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

from PIL import Image

from tinyclip_ds.config import RecipeError
from tinyclip_ds.data import hf_layout, order, shards, sources
from tinyclip_ds.data.config import DataConfig

NEEDS = {"images": ("image",), "captions": ("text",), "pairs": ("image", "text")}
"""What a sample must hold, by the data list a stage reads."""


@runtime_checkable
class Part(Protocol):
    """One spec's samples, with random access: what every reader is (`sources.ImageSource`,
    `sources.PairSource`, `CaptionList`, `shards.ShardSet`, `hf.HFSource`; tests/test_mixture.py
    checks each) and what `Mixture` concatenates.

    A sample that cannot be used is a reason (a key of `decode.SKIP_REASONS` for ``load``, of
    `decode.CAPTION_SKIP_REASONS` for ``captions_of``), never an exception. A part read for
    images only may refuse ``captions_of``, and one read for captions only ``load``: the stage
    never asks."""

    @property
    def spec(self) -> str: ...  # the recipe spec it was read from
    @property
    def skipped(self) -> Counter[str]: ...  # samples left out while indexing, per reason

    def __len__(self) -> int: ...
    def load(self, index: int) -> Image.Image | str: ...
    def captions_of(self, index: int) -> list[str] | str: ...
    def describe(self, index: int) -> str: ...  # sample ``index`` for a message: its file or its id
    def summary(self) -> str: ...  # one line for the run's log


class CaptionList:
    """Captions held in memory (a .txt or COCO file, the demo): each caption is one sample."""

    def __init__(self, spec: str, captions: Sequence[str]) -> None:
        self.spec = spec
        self.captions = sources.TextTable(captions)
        self.skipped: Counter[str] = Counter()

    def __len__(self) -> int:
        return len(self.captions)

    def load(self, index: int) -> str:
        raise TypeError(f"{self.spec} holds captions only")

    def captions_of(self, index: int) -> list[str]:
        return [self.captions[index]]

    def describe(self, index: int) -> str:
        return f"{self.spec} #{index}"

    def summary(self) -> str:
        return f"{len(self)} captions"


class Mixture:
    """The concatenation of a stage's parts: global index ``i`` is sample ``i - starts[p]`` of
    part ``p``. Which indices training draws, and how often, is `order.GlobalOrder`'s business."""

    def __init__(self, parts: Sequence[Part]) -> None:
        self.parts = list(parts)
        self.sizes = [len(part) for part in self.parts]
        self.starts = [sum(self.sizes[:p]) for p in range(len(self.parts))]

    def __len__(self) -> int:
        return sum(self.sizes)

    def locate(self, index: int) -> tuple[Part, int]:
        """The part holding global ``index`` and the index within it."""
        p = bisect.bisect_right(self.starts, index) - 1
        return self.parts[p], index - self.starts[p]

    def load(self, index: int) -> Image.Image | str:
        """Image ``index``, or the reason it cannot be used."""
        part, local = self.locate(index)
        return part.load(local)

    def captions_of(self, index: int) -> list[str] | str:
        """The captions of sample ``index``, or the reason there is none to use."""
        part, local = self.locate(index)
        return part.captions_of(local)

    def source_of(self, index: int) -> str:
        """The recipe spec sample ``index`` came from."""
        return self.locate(index)[0].spec

    def describe(self, index: int) -> str:
        """Sample ``index`` for a message: its file, or its id within its source."""
        part, local = self.locate(index)
        return part.describe(local)

    @property
    def skipped(self) -> Counter[str]:
        """Samples left out while indexing, per reason, over all parts."""
        return sum((part.skipped for part in self.parts), Counter())

    def summary(self) -> str:
        """One line per source and one for the mixture (what the run prints at start)."""
        lines = [f"  {part.spec}: {part.summary()}" for part in self.parts]
        line = f"{len(self)} samples in {len(self.parts)} source(s)"
        if self.skipped:
            line += "; skipped while indexing: " + ", ".join(f"{r} {n}" for r, n in sorted(self.skipped.items()))
        return "\n".join([line, *lines])


def read_part(spec: str, kind: str, data: DataConfig, key: str, split_key: str = "data.split") -> Part:
    """The part a spec names, read for ``kind`` ("images", "captions" or "pairs"); ``split_key``
    names the option that set ``data.split``, for errors."""
    large = _large_scale_reader(spec)
    if large == "shards":
        return shards.ShardSet(spec, key=key, need=NEEDS[kind], max_caption_chars=data.max_caption_chars,
                               cache_dir=data.index_cache or None)
    if large == "hf":
        from tinyclip_ds.data.hf import HFSource  # imported here: importing datasets takes seconds

        return HFSource(spec, key=key, need=NEEDS[kind], image_column=data.image_column,
                        caption_column=data.caption_column, split=data.split,
                        max_caption_chars=data.max_caption_chars, image_root=data.image_root,
                        split_key=split_key)
    suffix = Path(spec).suffix.lower()
    # A pairs file serves the stages that need only half of it: stage 1 image reads its images,
    # stage 1 text the captions of a .csv/.tsv (a COCO .json already gives every caption).
    if kind == "pairs" or (kind == "images" and suffix in (".csv", ".tsv", ".json")) or (
            kind == "captions" and suffix in (".csv", ".tsv")):
        return sources.pair_source(spec, data.image_root, data.csv_image_key, data.csv_caption_key, key=key)
    if kind == "images":
        return sources.image_source(spec, key=key)
    return CaptionList(spec, sources.caption_source(spec, key=key))


def _large_scale_reader(spec: str) -> str | None:
    """"shards", "hf" or None (a spec `tinyclip_ds.data.sources` reads)."""
    if spec.startswith("demo:"):
        return None
    if shards.is_shard_spec(spec):
        return "shards"
    return "hf" if hf_layout.is_hf_spec(Path(spec).expanduser()) else None


def training_mixture(kind: str, data: DataConfig) -> Mixture:
    """Every source of ``data.<kind>``, read and concatenated in the order listed."""
    specs = getattr(data, kind)
    if not specs:
        raise RecipeError(f"'data.{kind}' is empty; give at least one source")
    check_weights(data, kind)
    parts = [read_part(spec, kind, data, f"data.{kind}[{i}]") for i, spec in enumerate(specs)]
    for i, part in enumerate(parts):
        if len(part) == 0:
            raise RecipeError(f"'data.{kind}[{i}]': {specs[i]} holds no samples ({part.summary()}); remove it "
                              f"from 'data.{kind}' or point it at the data")
    return Mixture(parts)


def retrieval_pairs(spec: str, image_root: str, data: DataConfig, key: str = "eval.data", split: str = "",
                    split_key: str = "eval.split") -> tuple[sources.PairSource | Mixture, list[str], list[int]]:
    """A retrieval set ``(images, captions, text_to_image)`` as `sources.eval_pairs` returns it,
    from any pairs spec: a shard set or a dataset is read whole (evaluation sets are small), and
    a sample without a usable caption is an error, since evaluation sets must be complete.
    ``split``: a dataset's split ('' = its only one), never the training data's ``data.split``."""
    if _large_scale_reader(spec) is None:
        return sources.eval_pairs(spec, image_root, data.csv_image_key, data.csv_caption_key, key=key)
    part = read_part(spec, "pairs", dataclasses.replace(data, image_root=image_root, split=split), key, split_key)
    per_sample = []
    for i in range(len(part)):
        captions = part.captions_of(i)
        if isinstance(captions, str):
            raise RecipeError(f"'{key}': sample {part.describe(i)} has no usable caption ({captions}); "
                              f"evaluation sets must be complete: fix or remove it")
        per_sample.append(captions)
    if not per_sample:
        raise RecipeError(f"'{key}': {spec} holds no image-caption pairs ({part.summary()})")
    captions = [caption for per_image in per_sample for caption in per_image]
    text_to_image = [i for i, per_image in enumerate(per_sample) for _ in per_image]
    return Mixture([part]), captions, text_to_image


def check_weights(data: DataConfig, kind: str) -> None:
    """``data.weights`` is empty or has one positive weight per source of ``data.<kind>``."""
    specs = getattr(data, kind)
    order.check_weights(data.weights, len(specs), f"the {len(specs)} sources of 'data.{kind}'")
