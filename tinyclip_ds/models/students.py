"""Students: smaller CLIP towers built from a teacher's shape, optionally weight-shared."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from tinyclip_ds.config import option


@dataclass
class StudentTowerConfig:
    width: int = option(0, "residual width; 0 = the teacher tower's width")
    layers: int = option(4, "number of unique transformer blocks")
    heads: int = option(0, "attention heads; 0 = the teacher tower's head count")
    mlp_ratio: float = option(4.0, "MLP hidden width as a multiple of the width")
    repeat: int = option(1, "apply each unique block this many times (MiniViT weight sharing); "
                            "effective depth = layers × repeat")
    patch_size: int = option(0, "image tower patch size; 0 = the teacher's")
    context_length: int = option(0, "text tower context length; 0 = the teacher's")
    output_dim: int = option(0, "embedding dimension; 0 = the teacher's (required to pair a "
                                "student tower with the teacher's other tower)")
    act: Literal["teacher", "gelu", "quick_gelu"] = option(
        "teacher", "MLP activation; 'teacher' copies the teacher's")
    dropout: float = option(0.0, "dropout on the residual branches (it hurt in the research notes)")
    layer_map: str | list[int] = option(
        "uniform", "which teacher layer each distilled student layer learns from: uniform "
                   "(TinyBERT i·k+k−1), begin, end, or an explicit list of teacher layers")
    distill_layers: list[int] | None = option(
        None, "effective student layers that get intermediate-layer losses; null = all")
    init: Literal["random", "inherit"] = option(
        "inherit", "initialisation: random, or inherit mapped layers from the teacher "
                   "(leading channels and heads sliced when narrower)")
    freeze_embed: bool = option(False, "copy the teacher's patch/token and positional "
                                       "embeddings and keep them frozen")
    init_from: str = option("", "stage 2: a stage-1 run directory or checkpoint to load this "
                                "tower from ('' = use `init`)")


@dataclass
class StudentConfig:
    image: StudentTowerConfig = option(StudentTowerConfig(), "the student image tower")
    text: StudentTowerConfig = option(StudentTowerConfig(), "the student text tower")
