"""Every use of DeepSpeed's private or undocumented internals, each behind one named function.

Each function says which behaviour of DeepSpeed 0.19 it depends on and why no public API does
the same. tests/test_deepspeed_internals.py checks every one of these assumptions on real
engines and names the one that broke when a DeepSpeed upgrade changes it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch


def optimizer_keeps_grad_norm(engine) -> bool:
    """Whether the engine's optimizer measures the gradient norm itself.

    DeepSpeed 0.19's ZeRO 1–3, bf16 and fp16 optimizers keep the norm of the reduced gradients
    in their private ``_global_grad_norm``, which ``engine.step()`` copies to
    ``engine.get_global_grad_norm()``, and skip a step whose norm is not finite. A plain torch
    optimizer (ZeRO-0 in fp32) has no such attribute: the engine clips with the norm, drops it,
    and applies inf/NaN gradients. The engine has no public way to say which kind it wrapped,
    and ``get_global_grad_norm()`` answers only after the step."""
    return hasattr(engine.optimizer, "_global_grad_norm")


def finish_step_without_update(engine) -> None:
    """``engine.step()`` at an accumulation boundary without the optimizer's update: DeepSpeed's
    bookkeeping runs (global and micro step counts, samples, clearing the gradients), the
    parameters and optimizer state stay as they were, and the learning-rate schedule, which the
    engine advances regardless, is put back. Only for a plain torch optimizer
    (`optimizer_keeps_grad_norm` false): DeepSpeed's own skip such steps themselves.

    DeepSpeed 0.19 has no public way to end a boundary without an update, and not calling
    ``engine.step()`` would put the micro-step count out of phase with the accumulation. So the
    torch optimizer's parameter groups are emptied for the step, and its ``step()`` updates
    nothing. (Dropping the gradients instead breaks DeepSpeed's ZeRO-0 clipping, which indexes
    the first gradient; shadowing ``optimizer.step`` replaces the wrapper torch's schedule puts
    on it.) Depends on the ZeRO-0 step clipping the module's gradients itself, then calling the
    optimizer's ``step()``, and on ``engine.lr_scheduler`` being the schedule it advances."""
    if optimizer_keeps_grad_norm(engine):
        raise ValueError(f"{type(engine.optimizer).__name__} is DeepSpeed's own optimizer, which skips "
                         f"steps with non-finite gradients itself")
    optimizer, schedule = engine.optimizer, engine.lr_scheduler
    saved = schedule.state_dict() if schedule is not None else None
    rates = [group["lr"] for group in optimizer.param_groups]
    params = [group["params"] for group in optimizer.param_groups]
    for group in optimizer.param_groups:
        group["params"] = []
    try:
        engine.step()
    finally:
        for group, own in zip(optimizer.param_groups, params):
            group["params"] = own
    if schedule is not None:
        schedule.load_state_dict(saved)
    for group, rate in zip(optimizer.param_groups, rates):
        group["lr"] = rate


def repair_zero3_universal_load(engine, universal_dir: Path) -> None:
    """Undo two slips of DeepSpeed 0.19's ZeRO-3 universal loader: it copies the first
    parameter group's hyperparameters (weight decay included) to every group, and it gives
    every group the *same* ``step`` tensor, which torch's AdamW then increments once per group.

    Call after ``engine.load_checkpoint`` of the universal checkpoint in ``universal_dir``.
    Depends on DeepSpeed internals no public API exposes: the ZeRO-3 optimizer wraps the torch
    optimizer as ``engine.optimizer.optimizer`` (whose ``state`` holds the ``step`` tensors),
    and the universal conversion writes ``zero/optimizer_state.pt`` with the saved
    ``param_groups`` (one per group, in order) next to pickled LossScaler, DynamicLossScaler
    and ZeroStageEnum objects."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    universal_dir = Path(universal_dir)
    # DeepSpeed pickles these objects; weights-only loading rebuilds them from their attributes
    # (and the enum from its value) without running other code.
    with torch.serialization.safe_globals([LossScaler, DynamicLossScaler, ZeroStageEnum]):
        saved = torch.load(universal_dir / "zero" / "optimizer_state.pt", map_location="cpu",
                           weights_only=True, mmap=True)
    optimizer = engine.optimizer.optimizer
    if len(saved["param_groups"]) != len(optimizer.param_groups):
        raise ValueError(f"{universal_dir}: {len(saved['param_groups'])} optimizer parameter groups saved, "
                         f"the optimizer has {len(optimizer.param_groups)}")
    for group, values in zip(optimizer.param_groups, saved["param_groups"]):
        group.update({key: value for key, value in values.items() if key != "params"})
    for state in optimizer.state.values():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()


def ds_to_universal(checkpoint_dir: Path, output_dir: Path, workers: int = 1) -> None:
    """Convert the ZeRO checkpoint ``checkpoint_dir`` (one tag's directory) to DeepSpeed's
    universal format in ``output_dir``; DeepSpeed also writes a ``latest_universal`` file beside
    ``output_dir``.

    DeepSpeed documents ``ds_to_universal`` as a command-line script only; its ``main`` takes
    the script's parsed arguments, which DeepSpeed 0.19 reads as exactly these seven attributes
    (a version that adds one would fail here with an AttributeError on it)."""
    from deepspeed.checkpoint.ds_to_universal import main

    main(argparse.Namespace(input_folder=str(checkpoint_dir), output_folder=str(output_dir),
                            num_extract_workers=workers, num_merge_workers=workers,
                            keep_temp_folder=False, strict=True, inject_missing_state=False))
