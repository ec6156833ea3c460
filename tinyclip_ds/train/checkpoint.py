"""DeepSpeed checkpoints with client state, completion markers, retention, and resuming on
another number of ranks (or another ZeRO stage) through DeepSpeed's universal format.

Layout: ``<run_dir>/checkpoints/step_00000100/`` is one DeepSpeed tag. A save is written to a
hidden ``.step_00000100.saving/``: every rank writes its shards (and its ``rank_XXXXX.pt`` with
the rank's RNG states) and flushes them to disk; after a barrier rank 0 writes the ``COMPLETE``
marker and renames the directory into place. A run killed mid-save therefore leaves only a
hidden directory, which ``--resume auto`` never sees and the next save cleans up; the marker
is still required of every ``step_*`` directory (one copied by hand, or torn by older code).

Rank 0 also writes what the checkpoint holds (``student.json``, `model_record`: stage, student
tower shapes, every parameter's name, shape and trainability) and a copy of the run's
``recipe.yaml``, so that a resume or a stage-2 ``init_from`` with another stage or student shape
is refused by name before anything is loaded: `check_resume` needs no model and runs before the
run directory is written; `check_parameters` compares the built model's parameters.

Resuming on another world size or ZeRO stage (`plan_resume`) converts the checkpoint once with
DeepSpeed's ``ds_to_universal`` into ``step_.../universal/`` (renamed into place only when the
conversion finished) and loads that with ``"checkpoint": {"load_universal": true}``.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from tinyclip_ds import distributed
from tinyclip_ds.config import RecipeError, option
from tinyclip_ds.models.students import (describe_differences, shape_differences, shape_record,
                                         tower_parameter_shapes)
from tinyclip_ds.models.transformer import TextTower, TowerShape, VisionTower

MARKER = "COMPLETE"
RECORD = "student.json"  # what the checkpoint holds: `model_record`
RECIPE = "recipe.yaml"  # the recipe of the run that saved the checkpoint
TOWER_PREFIXES = {"stage1_image": {"image": "tower."}, "stage1_text": {"text": "tower."},
                  "stage2": {"image": "image.", "text": "text."}}
"""Where each stage's engine module keeps its student towers (stage1.Stage1Student,
stage2.Stage2Student): parameter-name prefix per tower kind."""
UNIVERSAL = "universal"  # the cached universal conversion, a subdirectory of the checkpoint
UNIVERSAL_STAGING = ".universal_staging"


@dataclass
class CheckpointConfig:
    every: int = option(1000, "save a checkpoint every this many optimizer steps (and at the end); 0 = end only")
    keep_last: int = option(3, "complete checkpoints to keep (older ones are deleted); 0 = keep all")


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


def rng_state() -> dict:
    """This process's RNG states as tensors and plain data, so that they load weights-only."""
    kind, keys, *rest = np.random.get_state()
    return {"python": random.getstate(), "numpy": (kind, keys.tolist(), *rest),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict) -> None:
    """Restore the RNG states `rng_state` returned."""
    random.setstate(state["python"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


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


def model_record(module: nn.Module) -> dict:
    """What a checkpoint of a stage's engine module holds: the stage (known by where the module
    keeps its towers, `TOWER_PREFIXES`), each student tower's `shape_record` and every
    parameter's name, shape and trainability (full shapes also under ZeRO-3 partitioning)."""
    towers = {name: child for name, child in module.named_children() if isinstance(child, (VisionTower, TextTower))}
    kinds = {name: "image" if isinstance(tower, VisionTower) else "text" for name, tower in towers.items()}
    stage = next((stage for stage, prefixes in TOWER_PREFIXES.items()
                  if {prefix[:-1]: kind for kind, prefix in prefixes.items()} == kinds), None)
    return {"stage": stage,
            "towers": {kinds[name]: shape_record(kinds[name], tower.shape) for name, tower in towers.items()},
            "parameters": {name: {"shape": list(getattr(param, "ds_shape", param.shape)),
                                  "trainable": param.requires_grad}
                           for name, param in module.named_parameters()}}


def saved_record(path: Path) -> dict:
    """The `model_record` of checkpoint ``path``. A checkpoint saved before records existed gets
    what DeepSpeed's model-states file tells: parameter shapes and the stage their names imply,
    no tower shapes (so head count and activation cannot be checked)."""
    path = Path(path)
    if (path / RECORD).is_file():
        return json.loads((path / RECORD).read_text())
    parameters = _parameter_shapes_from_states(path)
    embedding = {"image": "patch_embed.weight", "text": "token_embedding.weight"}
    stage = next((stage for stage, prefixes in TOWER_PREFIXES.items()
                  if all(prefix + embedding[kind] in parameters for kind, prefix in prefixes.items())), None)
    return {"stage": stage, "towers": {}, "parameters": parameters}


def _parameter_shapes_from_states(path: Path) -> dict[str, dict]:
    """Parameter shapes from DeepSpeed's model-states file (full tensors up to ZeRO-2, recorded
    shapes under ZeRO-3); empty when there is no readable file, leaving the check to DeepSpeed."""
    files = sorted(path.glob("*mp_rank_00_model_states.pt"))
    if not files:
        return {}
    try:
        states = torch.load(files[0], map_location="cpu", weights_only=True, mmap=True)
    except (OSError, RuntimeError, pickle.UnpicklingError):
        return {}
    buffers = set(states.get("buffer_names") or ())
    shapes = {name: list(value.shape) for name, value in states["module"].items() if name not in buffers}
    for group in [*(states.get("param_shapes") or []), states.get("frozen_param_shapes") or {}]:
        shapes.update({name: list(size) for name, size in group.items()})
    return {name: {"shape": shape} for name, shape in shapes.items()}


def recipe_of(path: Path) -> Path:
    """The recipe a checkpoint was saved with: its own copy, else its run directory's."""
    own = Path(path) / RECIPE
    return own if own.is_file() else Path(path).parent.parent / RECIPE


def check_resume(path: Path, stage: str, shapes: dict[str, TowerShape]) -> None:
    """Refuse (RecipeError) to resume checkpoint ``path`` with a recipe of another stage or other
    student tower ``shapes``, naming every difference. Needs no model, so a run checks it before
    it writes anything into its run directory."""
    saved = saved_record(path)
    fix = f"resume with the checkpoint's recipe ({recipe_of(path)}) or start a new run_dir"
    if saved["stage"] is not None and saved["stage"] != stage:
        raise RecipeError(f"checkpoint {path} was saved by a {saved['stage']} run; this recipe is {stage}: {fix}")
    if saved["towers"]:
        differences = [difference for kind, shape in shapes.items()
                       for difference in shape_differences(kind, saved["towers"][kind], shape)]
        if differences:
            was, now = describe_differences(differences)
            raise RecipeError(f"checkpoint {path} was saved by a {stage} run with {was}; this recipe has {now}: {fix}")
    elif saved["parameters"]:  # an older checkpoint: compare what its parameter shapes tell
        prefixes = TOWER_PREFIXES[stage]
        expected = {prefixes[kind] + name: value for kind, shape in shapes.items()
                    for name, value in tower_parameter_shapes(kind, shape).items()}
        found = {name: entry["shape"] for name, entry in saved["parameters"].items()
                 if name.startswith(tuple(prefixes.values()))}
        differences = [f"{name} {found.get(name, 'absent')} (this recipe: {expected.get(name, 'absent')})"
                       for name in sorted(expected.keys() | found.keys()) if found.get(name) != expected.get(name)]
        if differences:
            raise RecipeError(f"checkpoint {path} holds student towers of another shape than this recipe's: "
                              f"{', '.join(differences[:5])}: {fix}")


def check_parameters(path: Path, module: nn.Module) -> None:
    """Refuse (RecipeError) to load checkpoint ``path`` into ``module`` unless it holds exactly
    the module's parameters, with the same shapes and the same ones trainable (the learned parts
    of the loss terms and frozen embeddings depend on the recipe beyond the tower shapes)."""
    saved = saved_record(path)["parameters"]
    if not saved:
        return
    ours = model_record(module)["parameters"]
    problems = []
    if missing := [name for name in ours if name not in saved]:
        problems.append(f"not in the checkpoint: {', '.join(missing[:5])}")
    if extra := [name for name in saved if name not in ours]:
        problems.append(f"only in the checkpoint: {', '.join(extra[:5])}")
    if reshaped := [f"{name} {saved[name]['shape']} (this recipe: {ours[name]['shape']})" for name in ours
                    if name in saved and saved[name]["shape"] != ours[name]["shape"]]:
        problems.append(f"other shapes: {', '.join(reshaped[:5])}")
    if refrozen := [name for name, entry in ours.items()
                    if name in saved and saved[name].get("trainable", entry["trainable"]) != entry["trainable"]]:
        problems.append(f"trainable in one and frozen in the other: {', '.join(refrozen[:5])}")
    if problems:
        raise RecipeError(f"checkpoint {path} does not hold this recipe's model ({'; '.join(problems)}): resume "
                          f"with the checkpoint's recipe ({recipe_of(path)}) or start a new run_dir")


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
                raise RecipeError(f"checkpoint {path} is incomplete (no {MARKER} marker: the run stopped "
                                  f"while saving it); use 'auto' for the newest complete one")
            return path
    raise RecipeError(f"checkpoint '{resume}': no checkpoint directory at {candidates[0]} or {candidates[1]}")


def engine_precision(engine) -> str:
    """'bf16', 'fp16' or 'fp32': the precision a DeepSpeed engine trains in."""
    return "bf16" if engine.bfloat16_enabled() else "fp16" if engine.fp16_enabled() else "fp32"


def plan_resume(path: Path, world: int, zero_stage: int, precision: str, global_batch: int) -> bool:
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
    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

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
    args = argparse.Namespace(input_folder=str(path), output_folder=str(staging / UNIVERSAL),
                              num_extract_workers=workers, num_merge_workers=workers,
                              keep_temp_folder=False, strict=True, inject_missing_state=False)
    ds_to_universal(args)
    os.replace(staging / UNIVERSAL, target)
    shutil.rmtree(staging)
    return target


def prepare_resume(path: Path, universal: bool) -> None:
    """Collective: rank 0 converts ``path`` to the universal format when needed; all wait."""
    if universal and distributed.rank() == 0:
        convert_to_universal(path)
    distributed.barrier()


def load(engine, path: Path) -> dict:
    """Load a complete checkpoint into ``engine``; returns its client state. A checkpoint that
    does not hold the engine module's parameters is refused (`check_parameters`).

    An engine configured with ``load_universal`` reads the checkpoint's universal conversion
    (see `prepare_resume`). The saving rank's RNG states are restored when the world size is
    unchanged (otherwise there is no saving rank to match; the training randomness of this
    codebase comes from per-sample seeds, so only student dropout would differ)."""
    path = Path(path)
    check_parameters(path, engine.module)
    if engine.load_universal_checkpoint():
        load_dir, tag = path, UNIVERSAL
    else:
        load_dir, tag = path.parent, path.name
    _, client_state = engine.load_checkpoint(str(load_dir), tag=tag, load_module_strict=True,
                                             load_optimizer_states=True, load_lr_scheduler_states=True)
    if client_state is None:
        raise ValueError(f"DeepSpeed could not load the checkpoint {path}")
    if engine.load_universal_checkpoint() and engine.zero_optimization_stage() == 3:
        _repair_zero3_universal_load(engine, universal_path(path))
    rank_file = path / f"rank_{distributed.rank():05d}.pt"
    if rank_file.is_file() and marker_info(path)["world_size"] == distributed.world():
        try:
            set_rng_state(torch.load(rank_file, weights_only=True)["rng"])
        except pickle.UnpicklingError:
            raise RecipeError(f"{rank_file} holds Python objects besides tensors and plain data (it was "
                              f"written by an older tinyclip-ds), which loading could run as code; delete "
                              f"{path}/rank_*.pt to resume without its RNG states (only student dropout "
                              f"differs)") from None
    return client_state


def _repair_zero3_universal_load(engine, universal: Path) -> None:
    """Undo two slips of DeepSpeed 0.19's ZeRO-3 universal loader: it copies the first
    parameter group's hyperparameters (weight decay included) to every group, and it gives
    every group the *same* ``step`` tensor, which torch's AdamW then increments once per group."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    # DeepSpeed pickles these objects; weights-only loading rebuilds them from their attributes
    # (and the enum from its value) without running other code.
    with torch.serialization.safe_globals([LossScaler, DynamicLossScaler, ZeroStageEnum]):
        saved = torch.load(universal / "zero" / "optimizer_state.pt", map_location="cpu", weights_only=True,
                           mmap=True)
    optimizer = engine.optimizer.optimizer
    if len(saved["param_groups"]) != len(optimizer.param_groups):
        raise ValueError(f"{universal}: {len(saved['param_groups'])} optimizer parameter groups saved, "
                         f"the optimizer has {len(optimizer.param_groups)}")
    for group, values in zip(optimizer.param_groups, saved["param_groups"]):
        group.update({key: value for key, value in values.items() if key != "params"})
    for state in optimizer.state.values():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()


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
        states = torch.load(path / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=True)
        return {name: value.float() for name, value in states["module"].items()}
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(path.parent), tag=path.name)
