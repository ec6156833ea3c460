"""What every rank does before a stage's loop: distributed setup, run directory, DeepSpeed
config, teacher, evaluator; then the stage's loop (stage1.py or stage2.py)."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from tinyclip_ds.config import RecipeError
from tinyclip_ds.eval.evaluator import Evaluator
from tinyclip_ds.models.students import student_shapes
from tinyclip_ds.models.teachers import Teacher, load_teacher
from tinyclip_ds.recipe import Recipe
from tinyclip_ds.train import checkpoint
from tinyclip_ds.train.deepspeed_config import build_ds_config, precision, zero_stage
from tinyclip_ds.train.loop import SampleLog
from tinyclip_ds.train.monitor import Monitor


@dataclass
class Run:
    """The per-rank context a stage loop works in."""

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
    samples: SampleLog  # stages pass their batches through samples.track


def init_distributed() -> tuple[int, int, torch.device]:
    """Join the process group DeepSpeed's launcher set up (or make a one-rank group)."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    if "RANK" not in os.environ:  # started without a launcher: a single rank
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(port))
    deepspeed.init_distributed()
    accelerator = get_accelerator()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if accelerator.device_name() != "cpu":
        accelerator.set_device(local_rank)
    else:
        release_shared_memory_segment(dist.get_rank())
    device = torch.device(accelerator.device_name(local_rank) if accelerator.device_name() != "cpu" else "cpu")
    return dist.get_rank(), dist.get_world_size(), device


def shared_memory_segment(rank: int) -> Path:
    """The /dev/shm segment DeepSpeed's CPU backend creates for this rank when every rank runs on
    one machine (its shared-memory all-reduce; named as in deepspeed/ops/csrc/cpu/comm/shm.cpp)."""
    addr, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    return Path("/dev/shm") / f"deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{rank}"


def release_shared_memory_segment(rank: int) -> None:
    """Unlink this rank's ~70 MB shared-memory segment as soon as every rank has mapped it.

    DeepSpeed never unlinks it, so each CPU job left 70 MB × ranks of RAM in /dev/shm until the
    machine rebooted (a day of test runs filled a 24 GiB machine). After the barrier every rank
    has mapped every segment (DeepSpeed maps its peers' inside init_distributed), so the mappings
    stay valid and the kernel frees the memory when the last rank exits, however it exits."""
    dist.barrier()
    shared_memory_segment(rank).unlink(missing_ok=True)


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

    torch.manual_seed(recipe.seed)
    teacher = load_teacher(recipe.teacher).to(device)
    if resume_from:
        # Before anything is written: a refused resume leaves the run directory as it was.
        checkpoint.check_resume(resume_from, recipe.stage, student_shapes(recipe, teacher.clip))
    monitor = Monitor(run_dir, enabled=rank == 0)
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)  # recipe.yaml and ds_config.json: loop.start_state
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
    samples = SampleLog(run_dir / "samples.jsonl", recipe.train.log_samples, rank, world)
    return Run(recipe, rank, world, device, run_dir, ds_config, monitor, teacher, evaluator, resume_from,
               samples)


def train(recipe: Recipe, resume: str | None = None) -> int:
    """Run the recipe's stage on this rank; returns the process exit code."""
    run = prepare(recipe, resume)
    if recipe.stage == "stage2":
        from tinyclip_ds.train.stage2 import train_stage2

        return train_stage2(run)
    from tinyclip_ds.train.stage1 import train_stage1

    return train_stage1(run)
