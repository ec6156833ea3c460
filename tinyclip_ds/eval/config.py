"""The recipe's ``eval`` section: what is evaluated during training, and how often (read by
`evaluator.Evaluator` and the training loop). Torch-free, like every config module."""

from __future__ import annotations

from dataclasses import dataclass

from tinyclip_ds.config import Range, option


@dataclass
class EvalConfig:
    every: int = option(500, "evaluate every this many optimizer steps (and always at the end); 0 = end only",
                        range=Range(0, note="0 = at the end only"))
    data: str = option("", "paired validation set for retrieval: .csv/.tsv, COCO .json, webdataset "
                           "shards, a Hugging Face dataset, or demo:digits / demo:digit_pairs; '' = no "
                           "retrieval eval")
    image_root: str = option("", "folder that relative image paths in eval.data are resolved against; "
                                 "'' = the file's own folder, or <root>/<split>/ for a COCO file at "
                                 "<root>/annotations/captions_<split>.json")
    split: str = option("", "eval.data with several splits (a saved DatasetDict, a parquet folder or an "
                            "imagefolder with split files): the split evaluated; '' = its only split")
    zeroshot: str = option("", "classification set for zero-shot accuracy: a folder with one "
                               "sub-folder per class, or demo:digits; '' = none")
    templates: str = option("default", "zero-shot prompt templates: 'default' (the set's own, "
                                       "else a generic CLIP set) or a .txt file, one template with {} per line")
    batch_size: int = option(64, "evaluation batch size per rank (results do not depend on it)", range=Range(1))
    heatmap_size: int = option(32, "samples shown in the student-vs-teacher similarity heatmap", range=Range(1))
