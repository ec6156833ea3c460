"""Saving checkpoints: the layout, the staged save with its completion marker, and retention.

Layout: ``<run_dir>/checkpoints/step_00000100/`` is one DeepSpeed tag. A save is written to a
hidden ``.step_00000100.saving/``: every rank writes its shards (and its ``rank_XXXXX.pt`` with
the rank's RNG states) and flushes them to disk; after a barrier rank 0 writes the ``COMPLETE``
marker and renames the directory into place. A run killed mid-save therefore leaves only a
hidden directory, which ``--resume auto`` never sees and the next save cleans up; the marker
is still required of every ``step_*`` directory (one copied by hand, or torn by older code).

Rank 0 also writes what the checkpoint holds (`records`), so that a resume can be planned and
checked before any model is built (`train.resume`, which also loads checkpoints back).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from tinyclip_ds import distributed
from tinyclip_ds.config import RecipeError
from tinyclip_ds.train.records import RECIPE, RECORD, model_record
from tinyclip_ds.train.rng import rng_state

MARKER = "COMPLETE"


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (disk full, file too large, I/O error)."""


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def is_complete(path: Path) -> bool:
    return (Path(path) / MARKER).is_file()


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step_*") if p.is_dir() and is_complete(p))


def marker_info(path: Path) -> dict:
    """What the completion marker recorded: step, world size, ZeRO stage, global batch."""
    return json.loads((Path(path) / MARKER).read_text())


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _flush_to_disk(directory: Path) -> None:
    """fsync every file of ``directory`` and the directory itself, so that a marker written
    afterwards can never reach the disk before the data it vouches for (power loss, node crash)."""
    for path in directory.iterdir():
        if path.is_file():
            _fsync(path)
    _fsync(directory)


def _write_marker(directory: Path, info: dict) -> None:
    tmp = directory / (MARKER + ".tmp")
    tmp.write_text(json.dumps(info))
    os.replace(tmp, directory / MARKER)
    _fsync(directory / MARKER)
    _fsync(directory)


def staging_dir(run_dir: Path, step: int) -> Path:
    """Where the checkpoint of ``step`` is written until it is complete."""
    return checkpoint_dir(run_dir) / f".{tag_for(step)}.saving"


def save(engine, run_dir: Path, step: int, client_state: dict, keep_last: int) -> Path:
    """Save a checkpoint on every rank; it appears under its name only when all ranks are done."""
    from deepspeed.checkpoint.constants import UNIVERSAL_CHECKPOINT_INFO

    root = checkpoint_dir(run_dir)
    staging = staging_dir(run_dir, step)
    rank, world = distributed.rank(), distributed.world()
    if rank == 0:
        shutil.rmtree(staging, ignore_errors=True)  # torn by an earlier attempt: no stale shards
    distributed.barrier()
    # UNIVERSAL_CHECKPOINT_INFO lets ds_to_universal convert it for another world size later.
    state = {**client_state, UNIVERSAL_CHECKPOINT_INFO: {}}
    try:
        engine.save_checkpoint(str(root), tag=staging.name, client_state=state, save_latest=False)
        if rank == 0:
            (staging / RECORD).write_text(json.dumps(model_record(engine.module)) + "\n")
            if (Path(run_dir) / RECIPE).is_file():
                shutil.copyfile(Path(run_dir) / RECIPE, staging / RECIPE)
        torch.save({"rng": rng_state()}, staging / f"rank_{rank:05d}.pt")
        _flush_to_disk(staging)
    except (OSError, RuntimeError) as error:  # torch's writer reports a full disk as either
        complete = complete_checkpoints(run_dir)
        latest = f"{complete[-1]} stays the latest" if complete else "there is no complete checkpoint yet"
        raise CheckpointWriteError(
            f"rank {rank} could not write the checkpoint of step {step} into {staging} ({error}); "
            f"{latest}. Free disk space (or raise the file-size limit), then continue with --resume auto") from None
    distributed.barrier()
    if rank == 0:
        _write_marker(staging, {"step": step, "world_size": world, "zero_stage": engine.zero_optimization_stage(),
                                "precision": engine_precision(engine), "global_batch": engine.train_batch_size()})
        _publish(staging, root / tag_for(step))
        apply_retention(run_dir, keep_last)
    distributed.barrier()
    return root / tag_for(step)


def _publish(staging: Path, final: Path) -> None:
    """Rename a complete checkpoint into place. One already there for the same step (the one
    resumed from, or one of a timeline abandoned by resuming from an older checkpoint) is
    replaced only now that the new one is complete."""
    replaced = final.with_name(f".{final.name}.replaced")
    if final.exists():
        shutil.rmtree(replaced, ignore_errors=True)
        os.replace(final, replaced)
    os.replace(staging, final)
    _fsync(final.parent)
    shutil.rmtree(replaced, ignore_errors=True)


def apply_retention(run_dir: Path, keep_last: int) -> None:
    """Delete complete checkpoints beyond the newest ``keep_last``, incomplete ones older than
    the newest complete one, and the hidden leftovers of torn saves. Never deletes the newest
    complete checkpoint, nor anything when there is no complete checkpoint. Only called while
    no save is in progress (by `save`, after the barrier)."""
    root = checkpoint_dir(run_dir)
    complete = complete_checkpoints(run_dir)
    if not complete:
        return
    newest = complete[-1]
    doomed = complete[:-keep_last] if keep_last > 0 else []
    doomed += [p for p in root.glob("step_*") if p.is_dir() and not is_complete(p) and p.name < newest.name]
    doomed += [p for p in root.glob(".step_*") if p.is_dir()]
    for path in doomed:
        if path != newest:
            shutil.rmtree(path, ignore_errors=True)


def find_checkpoint(path: str | Path) -> Path | None:
    """A complete checkpoint directory as given, or a run directory's newest one; None if neither."""
    path = Path(path)
    if is_complete(path):
        return path
    complete = complete_checkpoints(path)
    return complete[-1] if complete else None


def resolve(run_dir: Path, which: str | None) -> Path | None:
    """The complete checkpoint ``which`` names (``--resume``, ``--checkpoint``): ``auto`` = the run's
    newest complete one (None if there is none), a tag of this run (``step_00000100``), or a path
    to a checkpoint directory; None for None."""
    if not which:
        return None
    if which == "auto":
        complete = complete_checkpoints(run_dir)
        return complete[-1] if complete else None
    candidates = [Path(which), checkpoint_dir(run_dir) / which]
    for path in candidates:
        if path.is_dir():
            if not is_complete(path):
                raise RecipeError(f"checkpoint {path} is incomplete (no {MARKER} marker: the run stopped "
                                  f"while saving it); use 'auto' for the newest complete one")
            return path
    raise RecipeError(f"checkpoint '{which}': no checkpoint directory at {candidates[0]} or {candidates[1]}")


def engine_precision(engine) -> str:
    """'bf16', 'fp16' or 'fp32': the precision a DeepSpeed engine trains in."""
    return "bf16" if engine.bfloat16_enabled() else "fp16" if engine.fp16_enabled() else "fp32"
