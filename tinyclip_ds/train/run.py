"""What every rank does before training: distributed setup, DeepSpeed config, teacher, the resume
plan (checked before the run directory is touched), evaluator — the `Run` the `Trainer` works in."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from tinyclip_ds.distributed import init_distributed
from tinyclip_ds.eval.evaluator import Evaluator
from tinyclip_ds.models.students import student_shapes
from tinyclip_ds.models.teachers import Teacher, load_teacher
from tinyclip_ds.recipe import Recipe
from tinyclip_ds.stages import STAGES
from tinyclip_ds.train.accounting import SampleLog
from tinyclip_ds.train.deepspeed_config import build_ds_config
from tinyclip_ds.train.monitor import Monitor
from tinyclip_ds.train.resume import ResumePlan, plan_resume, prepare_checkpoint


@dataclass
class Run:
    """The per-rank context the `Trainer` works in."""

    recipe: Recipe
    rank: int
    world: int
    device: torch.device
    run_dir: Path
    ds_config: dict
    monitor: Monitor
    teacher: Teacher
    evaluator: Evaluator
    plan: ResumePlan  # what the run takes from earlier runs
    samples: SampleLog  # every training batch passes through samples.track


def prepare(recipe: Recipe, resume: str | None) -> Run:
    """Everything a stage needs before its models are built, identical on every rank."""
    rank, world, device = init_distributed()
    ds_config = build_ds_config(recipe.ds_config, recipe.deepspeed, recipe.train, world)
    run_dir = recipe.output_dir
    teacher = load_teacher(recipe.teacher).to(device)
    # Seeded after the teacher is loaded: what a loader draws must not change the students'
    # learned parts (projections, logit scale), which the stage builds next.
    torch.manual_seed(recipe.seed)
    # Before anything is written: a refused plan leaves the run directory as it was.
    plan = plan_resume(recipe, resume, world, ds_config,
                       student_shapes(recipe.student, teacher.clip, STAGES[recipe.stage].towers))
    if plan.checkpoint:
        # Decided before deepspeed.initialize: the engine reads load_universal from its config.
        ds_config.setdefault("checkpoint", {})["load_universal"] = plan.universal
    monitor = Monitor(run_dir, enabled=rank == 0)
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)  # recipe.yaml and ds_config.json: Trainer.start
    monitor.print(f"run directory: {run_dir.resolve()}  ({recipe.stage}, {world} rank(s), {device})")
    for assumption in teacher.assumptions:
        monitor.print(f"teacher: {assumption}")
    for note in plan.notes:
        monitor.print(note)
    prepare_checkpoint(plan)

    evaluator = Evaluator(recipe.eval, recipe.data, teacher.image_size, teacher.image_mean,
                          teacher.image_std, teacher.tokenizer, device)
    samples = SampleLog(run_dir / "samples.jsonl", recipe.train.log_samples)
    return Run(recipe, rank, world, device, run_dir, ds_config, monitor, teacher, evaluator, plan, samples)
