"""Evaluation during training: retrieval and zero-shot, computed once on gathered embeddings."""

from __future__ import annotations

from dataclasses import dataclass

from tinyclip_ds.config import option


@dataclass
class EvalConfig:
    every: int = option(500, "evaluate every this many optimizer steps (and always at the end); 0 = end only")
    data: str = option("", "paired validation set for retrieval: .csv/.tsv, COCO .json or "
                           "demo:digits / demo:digit_pairs; '' = no retrieval eval")
    zeroshot: str = option("", "classification set for zero-shot accuracy: a folder with one "
                               "sub-folder per class, or demo:digits; '' = none")
    templates: str = option("default", "zero-shot prompt templates: default, demo, or a .txt file "
                                       "with one template per line containing {}")
    batch_size: int = option(64, "evaluation batch size per rank (results do not depend on it)")
