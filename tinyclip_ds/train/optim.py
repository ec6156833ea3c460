"""Optimizer and learning-rate schedule built from the recipe's training section."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from tinyclip_ds.config import option


@dataclass
class TrainConfig:
    steps: int = option(1000, "optimizer steps to train for")
    micro_batch: int = option(32, "samples per rank per forward/backward (DeepSpeed micro batch)")
    accumulation: int = option(0, "micro-batches per optimizer step; 0 = derived from "
                                  "global_batch, or 1 when global_batch is 0")
    global_batch: int = option(0, "samples per optimizer step over all ranks; 0 = "
                                  "micro_batch × accumulation × world size")
    accumulation_mode: Literal["feature_cache"] = option(
        "feature_cache", "stage 2: every micro-batch sees all micro_batch × accumulation × world "
                         "negatives (the only mode; named so that recipes of earlier runs still load)")
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
    log_samples: bool = option(False, "append the sample indices of every optimizer step to "
                                      "<run_dir>/samples.jsonl (to check resumed runs)")
    max_nonfinite: int = option(20, "stop (with a checkpoint) after this many steps in a row skipped for a "
                                    "non-finite loss")
    max_unusable: int = option(20, "stop (with a checkpoint and an error naming the data sources) after "
                                   "this many steps in a row without enough readable samples")


def parameter_groups(module: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: decay on weight matrices only; not on norms, biases, embeddings, logit scale."""
    decay, no_decay = [], []
    for name, param in module.named_parameters():
        if not param.requires_grad:
            continue
        exempt = param.ndim < 2 or "embedding" in name or "logit_scale" in name
        (no_decay if exempt else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def lr_factor(step: int, train: TrainConfig) -> float:
    """Multiplier of train.lr at optimizer step ``step``: linear warmup, then cosine or constant."""
    if step < train.warmup_steps:
        return (step + 1) / train.warmup_steps
    if train.schedule == "constant":
        return 1.0
    progress = min(1.0, (step - train.warmup_steps) / max(1, train.steps - train.warmup_steps))
    floor = train.min_lr / train.lr if train.lr else 0.0
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def build_optimizer(module: nn.Module, train: TrainConfig):
    """A torch AdamW and its LambdaLR schedule; DeepSpeed wraps both and checkpoints their state.

    Fused: one kernel over all parameters (CPU and GPU), where the default loops over them in
    Python — several times faster on the CPU for a CLIP student (bench/optimizer_step.py), and
    the kernel torch recommends on GPUs. DeepSpeed hands it the module's parameters, its fp32
    masters under bf16/fp16, or flat ZeRO partitions; the fused kernel takes each of them."""
    optimizer = torch.optim.AdamW(parameter_groups(module, train.weight_decay), lr=train.lr,
                                  betas=(train.beta1, train.beta2), eps=train.eps, fused=True)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, train))
    return optimizer, schedule
