"""What every rank does before training: distributed setup, run directory, DeepSpeed config,
resume plan, teacher, evaluator — the `Run` context the `Trainer` and the stage tasks work in."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from tinyclip_ds.config import RecipeError
from tinyclip_ds.data.transforms import train_transform
from tinyclip_ds.distributed import init_distributed
from tinyclip_ds.eval.evaluator import Evaluator
from tinyclip_ds.models.students import student_shapes
from tinyclip_ds.models.teachers import Teacher, load_teacher
from tinyclip_ds.recipe import Recipe
from tinyclip_ds.train import checkpoint
from tinyclip_ds.train.accounting import SampleLog
from tinyclip_ds.train.deepspeed_config import build_ds_config, precision, zero_stage
from tinyclip_ds.train.monitor import Monitor


@dataclass
class Run:
    """The per-rank context the `Trainer` and the stage tasks work in."""

    recipe: Recipe
    rank: int
    world: int
    device: torch.device
    run_dir: Path
    ds_config: dict
    monitor: Monitor
    teacher: Teacher
    evaluator: Evaluator
    resume_from: Path | None
    samples: SampleLog  # every training batch passes through samples.track

    def image_train_transform(self):
        """The recipe's training augmentation with the teacher's image size and normalisation."""
        data, teacher = self.recipe.data, self.teacher
        return train_transform(teacher.image_size, teacher.image_mean, teacher.image_std, data.randaugment,
                               data.randaugment_ops, data.randaugment_magnitude)


def prepare(recipe: Recipe, resume: str | None) -> Run:
    """Everything a stage needs before its models are built, identical on every rank."""
    rank, world, device = init_distributed()
    ds_config = build_ds_config(recipe.ds_config, recipe.deepspeed, recipe.train, world)
    run_dir = recipe.output_dir
    resume_from = checkpoint.resolve_resume(run_dir, resume)
    if resume is None and checkpoint.complete_checkpoints(run_dir):
        newest = checkpoint.complete_checkpoints(run_dir)[-1]
        raise RecipeError(f"{run_dir} already holds checkpoints (newest: {newest.name}); pass "
                          f"--resume auto to continue that run, or --set run_dir=<new dir> "
                          f"(or name=<new name>) to start a new one")
    universal = False
    if resume_from:
        # Decided before deepspeed.initialize: the engine reads load_universal from its config.
        universal = checkpoint.plan_resume(resume_from, world, zero_stage(ds_config), precision(ds_config),
                                           ds_config["train_batch_size"])
        ds_config.setdefault("checkpoint", {})["load_universal"] = universal

    teacher = load_teacher(recipe.teacher).to(device)
    # Seeded after the teacher is loaded: what a loader draws must not change the students'
    # learned parts (projections, logit scale), which the stage builds next.
    torch.manual_seed(recipe.seed)
    if resume_from:
        # Before anything is written: a refused resume leaves the run directory as it was.
        checkpoint.check_resume(resume_from, recipe.stage, student_shapes(recipe.student, teacher.clip, recipe.towers))
    monitor = Monitor(run_dir, enabled=rank == 0)
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)  # recipe.yaml and ds_config.json: Trainer.start
    monitor.print(f"run directory: {run_dir.resolve()}  ({recipe.stage}, {world} rank(s), {device})")
    for assumption in teacher.assumptions:
        monitor.print(f"teacher: {assumption}")
    if resume_from:
        saved = checkpoint.marker_info(resume_from)
        how = (f"converted once to DeepSpeed's universal format in {checkpoint.universal_path(resume_from)}"
               if universal else "loaded as saved")
        monitor.print(f"resuming from {resume_from} (saved by {saved['world_size']} rank(s) with "
                      f"ZeRO-{saved['zero_stage']}; {how})")
        checkpoint.prepare_resume(resume_from, universal)
    elif resume is not None:
        monitor.print(f"--resume {resume}: no complete checkpoint in {run_dir}; starting fresh")

    evaluator = Evaluator(recipe.eval, recipe.data, teacher.image_size, teacher.image_mean,
                          teacher.image_std, teacher.tokenizer, device)
    samples = SampleLog(run_dir / "samples.jsonl", recipe.train.log_samples)
    return Run(recipe, rank, world, device, run_dir, ds_config, monitor, teacher, evaluator, resume_from,
               samples)
