"""The DeepSpeed engine a stage trains, and its optimizer step with one non-finite policy.

A step whose gradients are not finite on some rank is not applied, on every rank: parameters,
optimizer state and learning-rate schedule stay as they were. DeepSpeed's optimizers skip such
a step themselves (ZeRO 1–3 and bf16 check the reduced gradients for inf/NaN, fp16 through its
loss scaler); only ZeRO-0 in fp32 hands the gradients to the plain torch optimizer, so
`engine_step` skips it there. A non-finite loss always gives non-finite gradients, so stages
back-propagate whatever they computed and read `OptimizerStep.applied`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from tinyclip_ds.train.config import TrainConfig
from tinyclip_ds.train.deepspeed_internals import finish_step_without_update, optimizer_keeps_grad_norm
from tinyclip_ds.train.optim import build_optimizer


def build_engine(module: nn.Module, ds_config: dict, train: TrainConfig):
    """The DeepSpeed engine around ``module`` with the recipe's AdamW and schedule."""
    import deepspeed

    optimizer, schedule = build_optimizer(module, train)
    engine, _, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, lr_scheduler=schedule,
                                           config=ds_config)
    return engine


@dataclass
class OptimizerStep:
    """What the optimizer step at an accumulation boundary did."""

    applied: bool  # False: non-finite gradients on some rank, nothing changed
    grad_norm: float | None  # before clipping, where DeepSpeed does not report it itself


def engine_step(engine) -> OptimizerStep | None:
    """``engine.step()`` after a micro-batch's backward; at the accumulation boundary, what the
    optimizer step did (None between boundaries).

    Where DeepSpeed keeps no gradient norm (ZeRO-0 without bf16 clips with it but drops it), it
    is measured here before the step clips; by then the gradients are averaged over ranks, so
    every rank sees the same norm and makes the same decision."""
    if not engine.is_gradient_accumulation_boundary():
        engine.step()
        return None
    measured = None
    if not optimizer_keeps_grad_norm(engine) and not engine.fp16_enabled():  # fp16 grads carry the loss scale
        grads = [p.grad.detach() for p in engine.module.parameters() if p.grad is not None]
        if grads:
            measured = torch.nn.utils.get_total_norm(grads).item()
        if measured is not None and not torch.isfinite(torch.tensor(measured)):
            finish_step_without_update(engine)
            return OptimizerStep(applied=False, grad_norm=None)
    engine.step()
    return OptimizerStep(applied=engine.was_step_applied(), grad_norm=measured)

