"""The recipe's ``train`` and ``checkpoint`` sections: optimisation (read by `optim`,
`deepspeed_config` and the training loop) and checkpointing (read by `checkpoint`).
Torch-free, like every config module: recipes load and validate without importing torch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from tinyclip_ds.config import Range, option

_DERIVED = Range(0, note="0 = derived")
_BETA = Range(0, 1, open_high=True)


@dataclass
class TrainConfig:
    steps: int = option(1000, "optimizer steps to train for", range=Range(1))
    micro_batch: int = option(32, "samples per rank per forward/backward (DeepSpeed micro batch)",
                              range=Range(1))
    accumulation: int = option(0, "micro-batches per optimizer step; 0 = derived from "
                                  "global_batch, or 1 when global_batch is 0", range=_DERIVED)
    global_batch: int = option(0, "samples per optimizer step over all ranks; 0 = "
                                  "micro_batch × accumulation × world size", range=_DERIVED)
    accumulation_mode: Literal["feature_cache"] = option(
        "feature_cache", "stage 2: every micro-batch sees all micro_batch × accumulation × world "
                         "negatives (the only mode; named so that recipes of earlier runs still load)")
    lr: float = option(1e-4, "peak learning rate", range=Range(0))
    min_lr: float = option(0.0, "learning rate at the end of the cosine schedule", range=Range(0))
    warmup_steps: int = option(100, "linear warmup steps", range=Range(0))
    schedule: Literal["cosine", "constant"] = option("cosine", "learning-rate schedule after warmup")
    weight_decay: float = option(0.05, "AdamW weight decay (not applied to norms, biases, embeddings)",
                                 range=Range(0))
    beta1: float = option(0.9, "AdamW β1", range=_BETA)
    beta2: float = option(0.98, "AdamW β2", range=_BETA)
    eps: float = option(1e-6, "AdamW ε", range=Range(0, open_low=True))
    freeze: Literal["none", "image", "text"] = option("none", "stage 2: keep one student tower frozen")
    log_every: int = option(10, "print and log training scalars every this many steps", range=Range(1))
    log_samples: bool = option(False, "append the sample indices of every optimizer step to "
                                      "<run_dir>/samples.jsonl (to check resumed runs)")
    max_nonfinite: int = option(20, "stop (with a checkpoint) after this many steps in a row skipped for a "
                                    "non-finite loss", range=Range(1))
    max_unusable: int = option(20, "stop (with a checkpoint and an error naming the data sources) after "
                                   "this many steps in a row without enough readable samples", range=Range(1))


@dataclass
class CheckpointConfig:
    every: int = option(1000, "save a checkpoint every this many optimizer steps (and at the end); "
                              "0 = end only", range=Range(0, note="0 = at the end only"))
    keep_last: int = option(3, "complete checkpoints to keep (older ones are deleted); 0 = keep all",
                            range=Range(0, note="0 = keep all"))
