"""Evaluation during training: retrieval and zero-shot, computed once on gathered embeddings.

Each rank embeds its share of every evaluation set; `gather_by_index` puts all rows back in
sample order on every rank; metrics are computed once on the full set, never averaged over
batches or ranks (a mean of per-batch recalls is not the recall of the set, and depends on
the batch size and the number of ranks). The numbers are bit-identical for any world size;
across different ``eval.batch_size`` values they differ only as much as the model's own
forward pass does between batch shapes (last-bit BLAS differences, ~1e-7 in fp32).

A *side* is what one tower contributes: the image side embeds the retrieval images and the
zero-shot images, the text side the retrieval captions and the zero-shot class prompts. In
stage 1 a student side is paired with the teacher's other side; in stage 2 both are students.
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from PIL import Image, ImageOps
from torch import Tensor

from tinyclip_ds import distributed
from tinyclip_ds.config import RecipeError
from tinyclip_ds.data.config import DataConfig
from tinyclip_ds.data.mixture import retrieval_pairs
from tinyclip_ds.data.sources import ImageSource, classification_source, text_lines
from tinyclip_ds.data.transforms import eval_transform
from tinyclip_ds.eval.config import EvalConfig
from tinyclip_ds.eval.gather import gather_by_index
from tinyclip_ds.eval.metrics import class_embeddings, retrieval_metrics, zeroshot_accuracy
from tinyclip_ds.eval.plots import chosen_rows
from tinyclip_ds.progress import progress

Encoder = Callable[[Tensor], Tensor]

DEFAULT_TEMPLATES = ["a photo of a {}.", "a bad photo of a {}.", "a photo of the large {}.",
                     "a photo of the small {}.", "a cropped photo of a {}.", "a close-up photo of a {}."]


@dataclass
class ImageSide:
    retrieval: Tensor | None  # (N_images, E) normalised
    zeroshot: Tensor | None  # (N_zeroshot, E) normalised


@dataclass
class TextSide:
    retrieval: Tensor | None  # (N_captions, E) normalised
    classes: Tensor | None  # (C, E) prompt-ensemble class embeddings


class Evaluator:
    """The recipe's validation sets, loaded once; embeds them with any pair of encoders.

    Every image of the sets is decoded once when it is built, so a missing or broken file stops
    the run at start rather than at its first evaluation, after training."""

    def __init__(self, cfg: EvalConfig, data: DataConfig, image_size: int, mean, std, tokenizer,
                 device: torch.device):
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.device = device
        self.transform = eval_transform(image_size, mean, std)
        self.retrieval = None
        if cfg.data:
            self.retrieval = retrieval_pairs(cfg.data, cfg.image_root, data, key="eval.data", split=cfg.split)
            check_images(self.retrieval[0], "eval.data")
        self.zeroshot = None
        self.templates: list[str] = []
        if cfg.zeroshot:
            images, labels, classnames, own_templates = classification_source(cfg.zeroshot)
            self.zeroshot = (images, torch.tensor(labels), classnames)
            self.templates = resolve_templates(cfg.templates, own_templates)
            check_images(images, "eval.zeroshot")

    @property
    def enabled(self) -> bool:
        return self.retrieval is not None or self.zeroshot is not None

    @torch.no_grad()
    def image_side(self, encode: Encoder) -> ImageSide:
        retrieval = self._encode_images(encode, self.retrieval[0], "eval.data") if self.retrieval else None
        zeroshot = self._encode_images(encode, self.zeroshot[0], "eval.zeroshot") if self.zeroshot else None
        return ImageSide(retrieval, zeroshot)

    @torch.no_grad()
    def text_side(self, encode: Encoder) -> TextSide:
        retrieval = None
        if self.retrieval:
            captions = self.retrieval[1]
            retrieval = self._encode_sharded(len(captions), lambda idx: self.tokenizer([captions[i] for i in idx]),
                                             encode, "eval.data captions")
        classes = None
        if self.zeroshot:
            classes = class_embeddings(lambda ids: encode(ids.to(self.device)).float(), self.tokenizer,
                                       self.zeroshot[2], self.templates, self.cfg.batch_size)
        return TextSide(retrieval, classes)

    def metrics(self, images: ImageSide, texts: TextSide) -> dict[str, float]:
        """Unprefixed metrics of one image side against one text side."""
        results = {}
        if self.retrieval:
            results.update(retrieval_metrics(images.retrieval, texts.retrieval,
                                             torch.tensor(self.retrieval[2])))
        if self.zeroshot:
            results.update(zeroshot_accuracy(images.zeroshot, self.zeroshot[1], texts.classes))
        return results

    def similarity_sample(self, images: ImageSide, texts: TextSide) -> Tensor | None:
        """Cosine similarities of the first retrieval images against their first captions."""
        if not self.retrieval:
            return None
        k = self.cfg.heatmap_size
        first_texts = [next(j for j, i in enumerate(self.retrieval[2]) if i == image)
                       for image in range(min(k, len(images.retrieval)))]
        return images.retrieval[:k] @ texts.retrieval[first_texts].T

    def retrieval_examples(self, images: ImageSide, texts: TextSide, rows: int = 4, k: int = 5,
                           thumbnail: int = 96) -> tuple[Tensor, list[str], list[Image.Image], list[int]] | None:
        """`plots.retrieval_grid`'s inputs for ``rows`` evenly spaced retrieval captions searched
        against the *whole* image set: their similarities to, and thumbnails of, only the images
        among their top ``k`` or correct (so the top ``k`` shown are the set's). Loads those few
        images (untransformed); call it where the picture is drawn (rank 0). None without eval.data."""
        if not self.retrieval:
            return None
        source, captions, owners = self.retrieval
        picked = chosen_rows(len(captions), rows)
        similarity = texts.retrieval[picked] @ images.retrieval.T
        top = similarity.topk(min(k, similarity.shape[1]), dim=1).indices
        shown = sorted(set(top.flatten().tolist()) | {owners[i] for i in picked})
        thumbs = []
        for i in shown:
            image = source.load(i)
            if not isinstance(image, Image.Image):
                raise unusable_image(source, i, image, "eval.data")
            thumbs.append(ImageOps.contain(image.convert("RGB"), (thumbnail, thumbnail)))
        return (similarity[:, shown], [captions[i] for i in picked], thumbs,
                [shown.index(owners[i]) for i in picked])

    def _encode_images(self, encode: Encoder, source: ImageSource, key: str) -> Tensor:
        def load(indices):
            images = []
            for i in indices:
                image = source.load(i)
                if not isinstance(image, Image.Image):  # removed or damaged since the run started
                    raise unusable_image(source, i, image, key)
                images.append(self.transform(image))
            return torch.stack(images)
        return self._encode_sharded(len(source), load, encode, f"{key} images")

    def _encode_sharded(self, total: int, load: Callable[[list[int]], Tensor], encode: Encoder,
                        desc: str = "") -> Tensor:
        """Embed the set in chunks of ``eval.batch_size`` samples dealt out to the ranks in turn,
        then gather the full set in sample order on every rank.

        Every forward pass has exactly ``batch_size`` samples (the last chunk is padded with
        copies of its first sample), so a chunk's embeddings are bit-identical whichever rank
        computes it and however many ranks there are: BLAS kernels can change with the number of
        rows, and with it the last bit of the result. Every rank runs the same number of forward
        passes (a rank without a chunk left embeds padding) because ZeRO-3 gathers parameters
        collectively inside forward.
        """
        rank, world = distributed.rank(), distributed.world()
        size = self.cfg.batch_size
        chunks = [list(range(start, min(start + size, total))) for start in range(0, total, size)]
        mine = chunks[rank::world]
        outputs, indices = [], []
        for turn in progress(range(math.ceil(len(chunks) / world)), desc=desc, unit="batch"):
            chunk = mine[turn] if turn < len(mine) else []
            batch = load(chunk or [0])
            batch = torch.cat([batch, batch[:1].expand(size - len(batch), *batch.shape[1:])])
            embedding = encode(batch.to(self.device)).float()[:len(chunk)]
            outputs.append(torch.nn.functional.normalize(embedding, dim=-1).cpu())
            indices += chunk
        return gather_by_index(torch.cat(outputs), torch.tensor(indices, dtype=torch.long), total)


def check_images(source: ImageSource, key: str) -> None:
    """Collective: decode every image of an evaluation set (each rank its share, in threads);
    a `RecipeError` on every rank, naming the first bad file, if one cannot be used."""
    mine = range(distributed.rank(), len(source), distributed.world())
    with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
        loaded = pool.map(lambda i: isinstance(source.load(i), Image.Image), mine)
        first_bad = next((i for i, good in zip(mine, loaded) if not good), None)
    bad = [i for i in distributed.gather_objects(first_bad) if i is not None]
    if bad:
        raise unusable_image(source, min(bad), source.load(min(bad)), key)


def unusable_image(source: ImageSource, index: int, reason, key: str) -> RecipeError:
    """The error for evaluation image ``index``, which `ImageSource.load` could not decode."""
    why = f" ({reason})" if isinstance(reason, str) else ""
    where = source.describe(index)
    return RecipeError(f"'{key}': evaluation image {where} cannot be used{why}; evaluation "
                       f"sets must be complete: fix or remove it")


def resolve_templates(spec: str, own: list[str] | None) -> list[str]:
    """Zero-shot templates: the set's own (or a generic CLIP set) for 'default', or a .txt file."""
    if spec == "default":
        return own or DEFAULT_TEMPLATES
    path = Path(spec)
    if not path.is_file():
        raise RecipeError(f"'eval.templates': {spec} is neither 'default' nor a .txt file of templates")
    templates = [line.strip() for line in text_lines(path, "eval.templates") if line.strip()]
    bad = [t for t in templates if t.count("{}") != 1]
    if not templates or bad:
        raise RecipeError(f"'eval.templates': every line of {path} needs exactly one {{}}; bad: {bad[:3]}")
    return templates
