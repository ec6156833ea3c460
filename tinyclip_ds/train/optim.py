"""Optimizer and learning-rate schedule built from the recipe's training section."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from tinyclip_ds.config import option


@dataclass
class TrainConfig:
    steps: int = option(1000, "optimizer steps to train for")
    micro_batch: int = option(32, "samples per rank per forward/backward (DeepSpeed micro batch)")
    accumulation: int = option(0, "micro-batches per optimizer step; 0 = derived from "
                                  "global_batch, or 1 when global_batch is 0")
    global_batch: int = option(0, "samples per optimizer step over all ranks; 0 = "
                                  "micro_batch × accumulation × world size")
    accumulation_mode: Literal["feature_cache", "plain"] = option(
        "feature_cache", "stage 2: feature_cache makes every micro-batch see all "
                         "micro_batch × accumulation × world negatives; plain does not (comparison only)")
    lr: float = option(1e-4, "peak learning rate")
    min_lr: float = option(0.0, "learning rate at the end of the cosine schedule")
    warmup_steps: int = option(100, "linear warmup steps")
    schedule: Literal["cosine", "constant"] = option("cosine", "learning-rate schedule after warmup")
    weight_decay: float = option(0.05, "AdamW weight decay (not applied to norms, biases, embeddings)")
    beta1: float = option(0.9, "AdamW β1")
    beta2: float = option(0.98, "AdamW β2")
    eps: float = option(1e-6, "AdamW ε")
    freeze: Literal["none", "image", "text"] = option("none", "stage 2: keep one student tower frozen")
    log_every: int = option(10, "print and log training scalars every this many steps")
    max_nonfinite: int = option(20, "stop (with a checkpoint) after this many non-finite losses in a row")
