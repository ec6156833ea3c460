"""Configuration of the training data (sources, augmentation, loading)."""

from __future__ import annotations

from dataclasses import dataclass

from tinyclip_ds.config import option


@dataclass
class DataConfig:
    images: list[str] = option([], "stage1_image sources: image folders (recursive) or demo:digits")
    captions: list[str] = option([], "stage1_text sources: .txt (one caption a line), COCO "
                                     "captions .json, or demo:digits")
    pairs: list[str] = option([], "stage2 sources: .csv/.tsv (image path + caption), COCO "
                                  "captions .json, or demo:digit_pairs")
    image_root: str = option("", "folder that relative image paths in data.pairs files are resolved "
                                 "against; '' = the file's own folder, or <root>/<split>/ for a COCO file at "
                                 "<root>/annotations/captions_<split>.json (eval.data has eval.image_root)")
    csv_image_key: str = option("filepath", "column of .csv/.tsv files holding the image path")
    csv_caption_key: str = option("title", "column of .csv/.tsv files holding the caption")
    randaugment: bool = option(True, "RandAugment without colour operations (colour operations hurt "
                                     "distillation)")
    randaugment_ops: int = option(2, "RandAugment: operations applied per image")
    randaugment_magnitude: int = option(9, "RandAugment: magnitude (0-30)")
    num_workers: int = option(2, "data-loader worker processes per rank")
