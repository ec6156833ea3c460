"""Resuming on another number of ranks or another ZeRO stage: which checkpoints need DeepSpeed's
universal format, and the conversion.

A checkpoint that needs it is converted once with DeepSpeed's ``ds_to_universal`` into
``step_.../universal/`` (renamed into place only when the conversion finished) and loaded with
``"checkpoint": {"load_universal": true}``.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from tinyclip_ds.config import RecipeError
from tinyclip_ds.train.checkpoint import marker_info
from tinyclip_ds.train.deepspeed_internals import ds_to_universal

UNIVERSAL = "universal"  # the cached universal conversion, a subdirectory of the checkpoint
UNIVERSAL_STAGING = ".universal_staging"


def needs_universal(path: Path, world: int, zero_stage: int, precision: str, global_batch: int) -> bool:
    """Whether resuming from ``path`` on ``world`` ranks with ``zero_stage`` and ``precision``
    needs the universal format (True) or loads the checkpoint as saved (False); a RecipeError
    for what cannot work (checked against DeepSpeed 0.19.8):

    - ZeRO-0 state is not sharded (every rank holds all of it): it loads directly on any world size;
    - ZeRO-0 <-> ZeRO-1/2/3: ``ds_to_universal`` needs ZeRO optimizer shards, and a ZeRO-0
      engine cannot load the universal format;
    - ZeRO-1/2 <-> ZeRO-3: the universal loaders of ZeRO-1/2 and ZeRO-3 read different file
      layouts, so each only reads conversions of its own kind;
    - another global batch would change which samples each step sees.
    """
    info = marker_info(path)
    saved_world, saved_stage = info["world_size"], info["zero_stage"]
    saved_precision = info.get("precision", precision)
    saved_batch = info.get("global_batch", global_batch)
    if saved_batch != global_batch:
        raise RecipeError(
            f"{path} was saved with a global batch of {saved_batch} samples per step, this launch "
            f"has {global_batch}; resuming with another global batch would change which samples "
            f"each step sees (some repeated, some skipped). Set --set train.global_batch={saved_batch} "
            f"--set train.accumulation=0 so the accumulation adapts to the number of ranks")
    family = {0: "ZeRO-0", 1: "ZeRO-1/2", 2: "ZeRO-1/2", 3: "ZeRO-3"}
    if family[saved_stage] != family[zero_stage]:
        raise RecipeError(
            f"{path} was saved with ZeRO stage {saved_stage}, this launch uses stage {zero_stage}; "
            f"DeepSpeed cannot move a checkpoint from {family[saved_stage]} to {family[zero_stage]}. "
            f"Resume with a {family[saved_stage]} DeepSpeed config (--set ds_config=...; any number "
            f"of ranks works), or start a new run initialised from its weights")
    if saved_stage == 0:
        return False
    return (saved_world, saved_stage, saved_precision) != (world, zero_stage, precision)


def universal_path(path: Path) -> Path:
    return Path(path) / UNIVERSAL


def convert_to_universal(path: Path, workers: int = 1) -> Path:
    """Convert the ZeRO checkpoint ``path`` to DeepSpeed's universal format, once: the result
    is cached in ``path/universal`` (moved there only when the conversion finished)."""
    path = Path(path)
    target = universal_path(path)
    if target.is_dir():
        return target
    if marker_info(path)["zero_stage"] == 0:
        raise RecipeError(f"{path} is a ZeRO-0 checkpoint: it is not sharded and loads directly on any "
                          f"number of ranks, and DeepSpeed's universal format needs ZeRO optimizer shards")
    staging = path / UNIVERSAL_STAGING
    shutil.rmtree(staging, ignore_errors=True)
    # ds_to_universal also writes a 'latest_universal' file beside its output: keep it in staging.
    ds_to_universal(path, staging / UNIVERSAL, workers)
    os.replace(staging / UNIVERSAL, target)
    shutil.rmtree(staging)
    return target

