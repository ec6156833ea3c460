"""Everything a run takes from earlier runs, planned and checked before anything is written.

A run continues a checkpoint (``--resume``) or starts stage-2 towers from stage-1 checkpoints
(``student.<kind>.init_from``). `plan_resume` decides all of it from the checkpoints' markers and
records alone — which checkpoint, whether it loads through DeepSpeed's universal format, which
stage-1 checkpoints — and refuses by name what cannot work, before the run directory is touched
and before any student is built (the teacher is loaded: the plan compares tower shapes). The plan is then applied in phases, in this order:

1. `prepare_checkpoint` (collective): the universal conversion, when the plan needs one;
2. `load_tower`: a stage-2 task loads each tower's stage-1 weights as it builds its model;
3. `load`: the engine loads the checkpoint (its parameters checked against the record first);
   the client state it returns holds the training state;
4. `check_data`: the training data the checkpoint's data position counts in must be the data the
   run has now.

Only after the last phase does the run write its files (`train.loop.Trainer.start`), so a refused
resume leaves the run directory as it was.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from tinyclip_ds import distributed
from tinyclip_ds.config import RecipeError
from tinyclip_ds.models.students import describe_differences, shape_differences, tower_parameter_shapes
from tinyclip_ds.models.transformer import TowerShape
from tinyclip_ds.recipe import Recipe
from tinyclip_ds.stages import STAGES
from tinyclip_ds.train.checkpoint import complete_checkpoints, find_checkpoint, marker_info, resolve
from tinyclip_ds.train.consolidate import consolidated_state_dict
from tinyclip_ds.train.deepspeed_config import precision, zero_stage
from tinyclip_ds.train.deepspeed_internals import repair_zero3_universal_load
from tinyclip_ds.train.records import check_parameters, recipe_of, saved_record
from tinyclip_ds.train.rng import set_rng_state
from tinyclip_ds.train.universal import UNIVERSAL, convert_to_universal, needs_universal, universal_path


@dataclass(frozen=True)
class InitSource:
    """Where a stage-2 tower's weights come from (``student.<kind>.init_from``)."""

    kind: str
    requested: str  # student.<kind>.init_from as the recipe gives it
    path: Path | None  # its newest complete stage-1 checkpoint; None: none there, and the recipe
    # allows starting from ``fallback`` (init_from_missing = 'init')
    fallback: str  # student.<kind>.init
    shape_recorded: bool = True  # False: saved before records existed, only parameter shapes are checked


@dataclass(frozen=True)
class ResumePlan:
    """What the run takes from earlier runs (see the module docstring)."""

    checkpoint: Path | None = None  # the checkpoint the run continues; None: a fresh start
    universal: bool = False  # it loads through DeepSpeed's universal format
    saved: dict = field(default_factory=dict)  # its completion marker: step, world size, ZeRO stage, ...
    init_from: dict[str, InitSource] = field(default_factory=dict)  # fresh stage-2 runs only
    notes: tuple[str, ...] = ()  # what the run prints about the plan at its start


def plan_resume(recipe: Recipe, resume: str | None, world: int, ds_config: dict,
                shapes: dict[str, TowerShape]) -> ResumePlan:
    """Decide and check what the run takes from earlier runs; reads checkpoint markers and records
    only. ``resume`` is ``--resume`` (None: a new run), ``shapes`` the student towers the recipe
    builds. Raises a RecipeError naming the problem and the fix."""
    run_dir = recipe.output_dir
    path = resolve(run_dir, resume)
    if resume is None and (existing := complete_checkpoints(run_dir)):
        raise RecipeError(f"{run_dir} already holds checkpoints (newest: {existing[-1].name}); pass "
                          f"--resume auto to continue that run, or --set run_dir=<new dir> "
                          f"(or name=<new name>) to start a new one")
    if path is None:
        notes = (f"--resume {resume}: no complete checkpoint in {run_dir}; starting fresh",) if resume else ()
        stage = STAGES[recipe.stage]
        init_from = {kind: init_source(kind, getattr(recipe.student, kind), shapes[kind])
                     for kind in stage.towers if stage.reads_init_from and getattr(recipe.student, kind).init_from}
        return ResumePlan(init_from=init_from, notes=notes)
    universal = needs_universal(path, world, zero_stage(ds_config), precision(ds_config),
                                ds_config["train_batch_size"])
    check_resume(path, recipe.stage, shapes)
    saved = marker_info(path)
    how = (f"converted once to DeepSpeed's universal format in {universal_path(path)}" if universal
           else "loaded as saved")
    note = f"resuming from {path} (saved by {saved['world_size']} rank(s) with ZeRO-{saved['zero_stage']}; {how})"
    # The towers' weights come from the checkpoint: stage-1 checkpoints named by init_from are not read.
    return ResumePlan(checkpoint=path, universal=universal, saved=saved, notes=(note,))


def check_resume(path: Path, stage: str, shapes: dict[str, TowerShape]) -> None:
    """Refuse (RecipeError) to resume checkpoint ``path`` with a recipe of another stage or other
    student tower ``shapes``, naming every difference. Needs no model."""
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
        prefixes = STAGES[stage].checkpoint_prefixes
        expected = {prefixes[kind] + name: value for kind, shape in shapes.items()
                    for name, value in tower_parameter_shapes(kind, shape).items()}
        found = {name: entry["shape"] for name, entry in saved["parameters"].items()
                 if name.startswith(tuple(prefixes.values()))}
        differences = [f"{name} {found.get(name, 'absent')} (this recipe: {expected.get(name, 'absent')})"
                       for name in sorted(expected.keys() | found.keys()) if found.get(name) != expected.get(name)]
        if differences:
            raise RecipeError(f"checkpoint {path} holds student towers of another shape than this recipe's: "
                              f"{', '.join(differences[:5])}: {fix}")


def init_source(kind: str, cfg, shape: TowerShape) -> InitSource:
    """Check ``student.<kind>.init_from`` (``cfg`` is ``student.<kind>``) against the tower
    ``shape`` the recipe builds: the newest complete checkpoint there, of a stage-1 run of this
    tower, with this shape. Head count and activation change no parameter shape: only the
    checkpoint's record can tell them."""
    key = f"student.{kind}.init_from"
    path = find_checkpoint(cfg.init_from)
    if path is None:
        if cfg.init_from_missing == "init":
            return InitSource(kind, cfg.init_from, None, cfg.init)
        raise RecipeError(f"'{key}' = {cfg.init_from}: no complete checkpoint there; run stage 1 "
                          f"first, or set {key}='' to start from student.{kind}.init")
    saved = saved_record(path)
    if saved["stage"] not in (None, f"stage1_{kind}"):
        raise RecipeError(f"'{key}' = {cfg.init_from}: {path} was saved by a {saved['stage']} run; it takes "
                          f"a stage1_{kind} run (or set {key}='' to start from student.{kind}.init)")
    if saved["towers"] and (differences := shape_differences(kind, saved["towers"][kind], shape)):
        was, now = describe_differences(differences)
        raise RecipeError(f"'{key}': the stage-1 checkpoint {path} was saved with {was}; this recipe "
                          f"has {now}: give student.{kind} the stage-1 run's shape (its recipe: "
                          f"{recipe_of(path)}) or change {key}")
    return InitSource(kind, cfg.init_from, path, cfg.init, shape_recorded=bool(saved["towers"]))


def prepare_checkpoint(plan: ResumePlan) -> None:
    """Phase 1, collective when resuming: rank 0 converts the checkpoint to the universal format
    when the plan says so; all wait."""
    if plan.checkpoint is None:
        return
    if plan.universal and distributed.rank() == 0:
        convert_to_universal(plan.checkpoint)
    distributed.barrier()


def load_tower(tower: nn.Module, source: InitSource, log: Callable[[str], None]) -> None:
    """Phase 2: load a stage-2 tower from its stage-1 checkpoint (or say why it keeps its
    initialisation)."""
    kind, key = source.kind, f"student.{source.kind}.init_from"
    if source.path is None:
        log(f"{kind} tower: no complete stage-1 checkpoint at {source.requested}; "
            f"starting from '{source.fallback}' initialisation instead")
        return
    if not source.shape_recorded:
        log(f"{kind} tower: {source.path} records no student shape (saved by an older version); only "
            f"parameter shapes are checked: head count and activation assumed to be this recipe's "
            f"(student.{kind}.heads={tower.shape.heads}, act={tower.shape.act})")
    state = consolidated_state_dict(source.path)
    prefix = STAGES[f"stage1_{kind}"].checkpoint_prefixes[kind]
    weights = {name[len(prefix):]: value for name, value in state.items() if name.startswith(prefix)}
    try:
        tower.load_state_dict(weights, strict=True)
    except RuntimeError as err:  # missing, unexpected or other-shaped parameters
        problems = " ".join(line.strip() for line in str(err).splitlines()[1:])
        raise RecipeError(f"'{key}': {source.path} does not hold a student.{kind} tower of this recipe's shape "
                          f"({problems[:600]}); was it a stage1_{kind} run with the same student.{kind}?") from None
    log(f"{kind} tower: loaded from stage-1 checkpoint {source.path}")


def load(engine, plan: ResumePlan) -> dict:
    """Phase 3: load the plan's checkpoint into ``engine``; returns its client state. A checkpoint
    that does not hold the engine module's parameters is refused (`check_parameters`).

    An engine configured with ``load_universal`` reads the checkpoint's universal conversion
    (see `prepare_checkpoint`). The saving rank's RNG states are restored when the world size is
    unchanged (otherwise there is no saving rank to match; the training randomness of this
    codebase comes from per-sample seeds, so only student dropout would differ)."""
    path = plan.checkpoint
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
        repair_zero3_universal_load(engine, universal_path(path))
    rank_file = path / f"rank_{distributed.rank():05d}.pt"
    if rank_file.is_file() and plan.saved["world_size"] == distributed.world():
        try:
            set_rng_state(torch.load(rank_file, weights_only=True)["rng"])
        except pickle.UnpicklingError:
            raise RecipeError(f"{rank_file} holds Python objects besides tensors and plain data (it was "
                              f"written by an older tinyclip-ds), which loading could run as code; delete "
                              f"{path}/rank_*.pt to resume without its RNG states (only student dropout "
                              f"differs)") from None
    return client_state


def check_data(saved_sizes: list[int], saved_weights: list[float], saved_seed: int,
               sizes: list[int], weights: list[float], seed: int) -> None:
    """Phase 4: refuse to continue a data position in other data. The checkpoint's training
    sources held ``saved_sizes`` samples, mixed with ``saved_weights`` in the order of
    ``saved_seed``; the run's now hold ``sizes`` with ``weights`` and ``seed``."""
    if (saved_sizes, saved_weights, saved_seed) != (sizes, weights, seed):
        raise RecipeError(
            f"the training data changed since the checkpoint: its sources held {saved_sizes} samples "
            f"with data.weights {saved_weights or '[]'} and seed {saved_seed}, now {sizes} with "
            f"{weights or '[]'} and seed {seed}; the data position would point at other samples. Resume with "
            f"the same data and seed, or start a new run initialised from this one's weights "
            f"(student.*.init_from)")
