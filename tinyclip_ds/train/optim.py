"""Optimizer and learning-rate schedule built from the recipe's training section."""

from __future__ import annotations

import math

import torch
from torch import nn

from tinyclip_ds.train.config import TrainConfig


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
