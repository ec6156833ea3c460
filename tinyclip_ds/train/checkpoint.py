"""DeepSpeed checkpoints with client state, completion markers and retention.

Layout: ``<run_dir>/checkpoints/step_00000100/`` is one DeepSpeed tag. Every rank writes its
shards (and its ``rank_XXXXX.pt`` with the rank's RNG states); after a barrier rank 0 writes
``COMPLETE`` last. Only a checkpoint with that marker counts: a run killed mid-save leaves a
directory without it, which ``--resume auto`` ignores and retention cleans up later.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from tinyclip_ds.config import option

MARKER = "COMPLETE"


@dataclass
class CheckpointConfig:
    every: int = option(1000, "save a checkpoint every this many optimizer steps (and at the end); 0 = end only")
    keep_last: int = option(3, "complete checkpoints to keep (older ones are deleted); 0 = keep all")


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
    """What the completion marker recorded: step, world size, ZeRO stage."""
    return json.loads((Path(path) / MARKER).read_text())


def rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def save(engine, run_dir: Path, step: int, client_state: dict, keep_last: int) -> Path:
    """Save a checkpoint on every rank; it becomes visible (complete) only when all ranks are done."""
    from deepspeed.checkpoint.constants import UNIVERSAL_CHECKPOINT_INFO

    root = checkpoint_dir(run_dir)
    tag = tag_for(step)
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    # UNIVERSAL_CHECKPOINT_INFO lets ds_to_universal convert it for another world size later.
    state = {**client_state, UNIVERSAL_CHECKPOINT_INFO: {}}
    engine.save_checkpoint(str(root), tag=tag, client_state=state, save_latest=False)
    torch.save({"rng": rng_state()}, root / tag / f"rank_{rank:05d}.pt")
    _barrier()
    if rank == 0:
        info = {"step": step, "world_size": world, "zero_stage": engine.zero_optimization_stage()}
        tmp = root / tag / (MARKER + ".tmp")
        tmp.write_text(json.dumps(info))
        os.replace(tmp, root / tag / MARKER)
        apply_retention(run_dir, keep_last)
    _barrier()
    return root / tag


def apply_retention(run_dir: Path, keep_last: int) -> None:
    """Delete complete checkpoints beyond the newest ``keep_last`` and incomplete ones older
    than the newest complete one. Never deletes the newest complete checkpoint."""
    complete = complete_checkpoints(run_dir)
    if not complete:
        return
    newest = complete[-1]
    doomed = complete[:-keep_last] if keep_last > 0 else []
    doomed += [p for p in checkpoint_dir(run_dir).glob("step_*")
               if p.is_dir() and not is_complete(p) and p.name < newest.name]
    for path in doomed:
        if path != newest:
            shutil.rmtree(path, ignore_errors=True)


def resolve_resume(run_dir: Path, resume: str | None) -> Path | None:
    """The checkpoint to resume from: ``auto`` = newest complete one (None if there is none),
    a tag of this run (``step_00000100``), or a path to a checkpoint directory."""
    if not resume:
        return None
    if resume == "auto":
        complete = complete_checkpoints(run_dir)
        return complete[-1] if complete else None
    candidates = [Path(resume), checkpoint_dir(run_dir) / resume]
    for path in candidates:
        if path.is_dir():
            if not is_complete(path):
                raise ValueError(f"checkpoint {path} is incomplete (no {MARKER} marker: the run "
                                 f"stopped while saving it); use --resume auto for the newest complete one")
            return path
    raise ValueError(f"--resume {resume}: no checkpoint directory at {candidates[0]} or {candidates[1]}")


def load(engine, path: Path) -> dict:
    """Load a complete checkpoint into ``engine``; returns its client state. The saving rank's
    RNG states are restored when the world size is unchanged (otherwise ranks differ anyway)."""
    path = Path(path)
    _, client_state = engine.load_checkpoint(str(path.parent), tag=path.name, load_module_strict=True,
                                             load_optimizer_states=True, load_lr_scheduler_states=True)
    if client_state is None:
        raise ValueError(f"DeepSpeed could not load the checkpoint {path}")
    rank = dist.get_rank() if dist.is_initialized() else 0
    rank_file = path / f"rank_{rank:05d}.pt"
    world = dist.get_world_size() if dist.is_initialized() else 1
    if rank_file.is_file() and marker_info(path)["world_size"] == world:
        set_rng_state(torch.load(rank_file, weights_only=False)["rng"])
    return client_state


def find_checkpoint(path: str | Path) -> Path | None:
    """A complete checkpoint directory as given, or a run directory's newest one; None if neither."""
    path = Path(path)
    if is_complete(path):
        return path
    complete = complete_checkpoints(path)
    return complete[-1] if complete else None


def consolidated_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Plain fp32 weights of the engine's module from a checkpoint, whatever its ZeRO stage.

    ZeRO 1-3 shards are consolidated from the fp32 master weights (DeepSpeed's zero_to_fp32);
    a ZeRO-0 checkpoint holds the whole module already (bf16 modules are upcast).
    """
    path = Path(path)
    if marker_info(path)["zero_stage"] == 0:
        states = torch.load(path / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
        return {name: value.float() for name, value in states["module"].items()}
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(path.parent), tag=path.name)
