"""Crash safety, pre-emption and exported weights: torn checkpoints are never picked, SIGTERM
saves and exits cleanly, retention keeps what resuming needs, export-weights loads strictly.

End-to-end cases use real launches (DeepSpeed's launcher, CPU ranks); retention, selection
and resume planning are checked on directories alone.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap

import psutil
import pytest
import torch

from conftest import DEEPSPEED, free_port, kill_during_save, launch
from tinyclip_ds.config import PROJECT_ROOT, RecipeError
from tinyclip_ds.export import load_student_weights
from tinyclip_ds.models.students import build_students
from tinyclip_ds.models.teachers import load_teacher
from tinyclip_ds.train import checkpoint
from tinyclip_ds.train.checkpoint import (MARKER, apply_retention, complete_checkpoints, is_complete, resolve,
                                          staging_dir, tag_for)
from tinyclip_ds.train.universal import needs_universal

FAST = ["--set", "train.micro_batch=4", "--set", "train.global_batch=8", "--set", "train.accumulation=0",
        "--set", "train.warmup_steps=1", "--set", "train.log_every=1", "--set", "eval.every=0",
        "--set", "eval.data=", "--set", "eval.zeroshot=", "--set", "data.num_workers=0"]
ENV = {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}


# ---------------------------------------------------------------- end to end

def test_rank_killed_while_saving_leaves_the_previous_checkpoint_latest(tmp_path):
    run_dir = tmp_path / "run"
    common = [*FAST, "--set", f"run_dir={run_dir}", "--set", "ds_config=zero2_fp32", "--set", "train.steps=4",
              "--set", "checkpoint.every=2", "--set", "checkpoint.keep_last=1"]
    # Rank 1 SIGKILLs itself after writing its step-4 shards, before the completion barrier.
    crashed = launch("stage1_text", *common, ranks=2, check=False, env=kill_during_save(rank=1, step=4))
    assert crashed.returncode != 0
    torn = staging_dir(run_dir, 4)
    assert (torn / "rank_00001.pt").is_file() and not is_complete(torn)
    step4 = run_dir / "checkpoints" / tag_for(4)
    assert not step4.exists()
    assert resolve(run_dir, "auto") == run_dir / "checkpoints" / tag_for(2)

    resumed = launch("stage1_text", *common, "--resume", "auto", ranks=2)
    assert "resumed at step 2" in resumed.stdout and "done: 4 steps" in resumed.stdout
    # Step 4 saved again, complete; keep_last=1 retired step 2; the torn attempt is gone.
    assert complete_checkpoints(run_dir) == [step4] and not torn.exists()
    assert checkpoint.marker_info(step4) == {"step": 4, "world_size": 2, "zero_stage": 2, "precision": "fp32",
                                             "global_batch": 8}


def start_training(run_dir, *extra: str, own_session: bool = False) -> tuple[subprocess.Popen, list[str]]:
    """Two ranks training "forever" under DeepSpeed's launcher; returns once step 2 is logged,
    with the output so far."""
    command = [DEEPSPEED, "--num_gpus", "2", "--master_port", str(free_port()), "launch/stage1_text.sh", *FAST,
               "--set", f"run_dir={run_dir}", "--set", "ds_config=zero2_fp32", "--set", "train.steps=100000",
               "--set", "checkpoint.every=0", *extra]
    process = subprocess.Popen(command, cwd=PROJECT_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, env={**os.environ, **ENV}, start_new_session=own_session)
    lines = []
    for line in process.stdout:
        lines.append(line)
        if line.startswith("step 2/"):
            break
    return process, lines


def preempted_at(output: str, run_dir) -> int:
    """The step the run printed it stopped at; checks that its checkpoint is the complete one."""
    stopped = [line for line in output.splitlines() if line.startswith("pre-empted (SIGTERM/SIGINT) at step")]
    assert len(stopped) == 1, output[-4000:]
    step = int(stopped[0].split()[4].rstrip(";"))
    assert 2 <= step < 100000
    assert complete_checkpoints(run_dir) == [run_dir / "checkpoints" / tag_for(step)]
    return step


def test_sigterm_to_one_rank_saves_on_all_and_exits_cleanly(tmp_path):
    """Pre-emption of a single rank: the ranks agree at the next step, save, and exit 0, so
    DeepSpeed's launcher exits 0 too."""
    run_dir = tmp_path / "run"
    process, lines = start_training(run_dir)
    try:
        ranks = [p for p in psutil.Process(process.pid).children(recursive=True)
                 if "--local_rank=1" in p.cmdline()]
        assert len(ranks) == 1, "".join(lines[-20:])
        ranks[0].send_signal(signal.SIGTERM)
        output = "".join(lines) + process.stdout.read()
        returncode = process.wait(timeout=300)
    finally:
        process.kill()
    assert returncode == 0, output[-4000:]
    preempted_at(output, run_dir)
    assert output.count("exits successfully") == 2  # the launcher saw both ranks exit 0


@pytest.mark.slow
def test_sigterm_to_the_whole_job_with_data_workers_saves(tmp_path):
    """Pre-emption as Slurm (or Ctrl-C) does it: every process of the job gets the signal,
    DataLoader workers included; DeepSpeed's launcher forwards it to the ranks once more."""
    run_dir = tmp_path / "run"
    process, lines = start_training(run_dir, "--set", "data.num_workers=2", own_session=True)
    try:
        os.killpg(process.pid, signal.SIGTERM)
        output = "".join(lines) + process.stdout.read()  # until every process of the job is gone
    finally:
        with contextlib.suppress(ProcessLookupError):  # whatever is left of the job
            os.killpg(process.pid, signal.SIGKILL)
    preempted_at(output, run_dir)


ENGINE_EMBEDDINGS = textwrap.dedent('''
    """Load a stage-2 checkpoint into a DeepSpeed engine (as resuming does) and embed fixed inputs."""
    import sys
    from pathlib import Path

    import torch

    from tinyclip_ds.distill.objectives import Stage2Objective
    from tinyclip_ds.models.students import build_students
    from tinyclip_ds.recipe import load_recipe
    from tinyclip_ds.train import checkpoint, resume
    from tinyclip_ds.train.engine import build_engine
    from tinyclip_ds.train.run import prepare
    from tinyclip_ds.train.stage2 import LogitScale, Stage2Student

    run_dir, scratch, out = map(Path, sys.argv[1:])
    recipe = load_recipe(run_dir / "recipe.yaml", [f"run_dir={scratch}"])
    run = prepare(recipe, str(checkpoint.complete_checkpoints(run_dir)[-1]))
    students = build_students(recipe.student, run.teacher.clip, recipe.towers, recipe.seed)
    module = Stage2Student(students["image"].tower, students["text"].tower,
                           LogitScale(recipe.loss.logit_scale_init, recipe.loss.logit_scale_max), {},
                           Stage2Objective(recipe.loss).student_tokens)
    engine = build_engine(module, run.ds_config, recipe.train)
    resume.load(engine, run.plan)
    generator = torch.Generator().manual_seed(0)
    size = run.teacher.image_size
    images = torch.randn(6, 3, size, size, generator=generator)
    ids = run.teacher.tokenizer(["seven and one", "two", "nine and nine", "zero", "four and five", "three"])
    engine.module.eval()
    with torch.no_grad():
        image = engine.module.image(images).embedding
        text = engine.module.text(engine.module.text.fit_context(ids)).embedding
    torch.save({"images": images, "ids": ids, "image": image, "text": text}, out)
''')


def test_exported_student_loads_strictly_and_matches_the_engine(tmp_path):
    run_dir = tmp_path / "run"
    launch("stage2", *FAST, "--set", f"run_dir={run_dir}", "--set", "ds_config=zero3_fp32",
           "--set", "train.steps=3", "--set", "train.lr=3e-3")
    exported = tmp_path / "student.safetensors"
    cli = subprocess.run([sys.executable, "-m", "tinyclip_ds.cli", "export-weights", str(run_dir),
                          "--out", str(exported)],
                         cwd=PROJECT_ROOT, capture_output=True, text=True, env={**os.environ, **ENV}, timeout=300)
    assert cli.returncode == 0, cli.stderr[-3000:]

    worker = tmp_path / "engine_embeddings.py"
    worker.write_text(ENGINE_EMBEDDINGS)
    reference = tmp_path / "engine.pt"
    engine_run = subprocess.run([sys.executable, str(worker), str(run_dir), str(tmp_path / "scratch"),
                                 str(reference)],
                                cwd=PROJECT_ROOT, capture_output=True, text=True, env={**os.environ, **ENV},
                                timeout=300)
    assert engine_run.returncode == 0, engine_run.stderr[-3000:]
    expected = torch.load(reference)

    recipe, students = load_student_weights(exported)
    from safetensors.torch import load_file

    weights = load_file(str(exported))
    assert {name.split(".", 1)[0] for name in weights} == {"image", "text"}
    assert all(value.dtype == torch.float32 for value in weights.values())
    fresh = {kind: student.tower for kind, student in
             build_students(recipe.student, load_teacher(recipe.teacher).clip, recipe.towers, recipe.seed).items()}
    for kind, tower in fresh.items():
        tower.load_state_dict({n[len(kind) + 1:]: v for n, v in weights.items() if n.startswith(kind + ".")},
                              strict=True)
        tower.eval()
    with torch.no_grad():
        for towers in (students, fresh):
            image = towers["image"](expected["images"]).embedding
            text = towers["text"](towers["text"].fit_context(expected["ids"])).embedding
            torch.testing.assert_close(image, expected["image"], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(text, expected["text"], rtol=1e-5, atol=1e-6)
    # Training moved the towers away from their initialisation: the comparison is not trivial.
    untrained = build_students(recipe.student, load_teacher(recipe.teacher).clip, ["image"],
                               recipe.seed)["image"].tower.eval()
    with torch.no_grad():
        assert (untrained(expected["images"]).embedding - expected["image"]).abs().max() > 1e-3


# ---------------------------------------------------------------- directories only

def fake_checkpoint(run_dir, step: int, complete: bool = True, world: int = 2, zero: int = 2,
                    precision: str = "fp32", global_batch: int = 64):
    path = run_dir / "checkpoints" / tag_for(step)
    path.mkdir(parents=True)
    (path / "mp_rank_00_model_states.pt").write_bytes(b"shard")
    if complete:
        (path / MARKER).write_text(json.dumps({"step": step, "world_size": world, "zero_stage": zero,
                                               "precision": precision, "global_batch": global_batch}))
    return path


def names(run_dir) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").iterdir())


def test_auto_picks_the_newest_complete_checkpoint(tmp_path):
    assert resolve(tmp_path, "auto") is None
    fake_checkpoint(tmp_path, 100)
    newest = fake_checkpoint(tmp_path, 200)
    fake_checkpoint(tmp_path, 300, complete=False)  # torn by a crash mid-save
    assert resolve(tmp_path, "auto") == newest
    assert resolve(tmp_path, tag_for(100)) == tmp_path / "checkpoints" / tag_for(100)
    assert resolve(tmp_path, str(newest)) == newest
    with pytest.raises(RecipeError, match="incomplete"):
        resolve(tmp_path, tag_for(300))
    with pytest.raises(RecipeError, match="no checkpoint directory"):
        resolve(tmp_path, tag_for(400))
    assert resolve(tmp_path, None) is None


def test_retention_keeps_the_newest_complete_ones_and_drops_older_torn_ones(tmp_path):
    for step in (100, 200, 300):
        fake_checkpoint(tmp_path, step)
    fake_checkpoint(tmp_path, 150, complete=False)
    fake_checkpoint(tmp_path, 400, complete=False)  # newer than every complete one: kept
    staging_dir(tmp_path, 500).mkdir()  # left by a save that was killed
    apply_retention(tmp_path, keep_last=2)
    assert names(tmp_path) == [tag_for(200), tag_for(300), tag_for(400)]
    apply_retention(tmp_path, keep_last=0)  # keep all complete ones
    assert names(tmp_path) == [tag_for(200), tag_for(300), tag_for(400)]


def test_retention_never_deletes_the_only_complete_checkpoint(tmp_path):
    fake_checkpoint(tmp_path, 100)
    fake_checkpoint(tmp_path, 200, complete=False)
    fake_checkpoint(tmp_path, 300, complete=False)
    for keep_last in (1, 2, 0):
        apply_retention(tmp_path, keep_last)
        assert names(tmp_path) == [tag_for(100), tag_for(200), tag_for(300)]
    assert resolve(tmp_path, "auto") == tmp_path / "checkpoints" / tag_for(100)


def test_retention_does_nothing_without_a_complete_checkpoint(tmp_path):
    fake_checkpoint(tmp_path, 100, complete=False)
    apply_retention(tmp_path, keep_last=1)
    assert names(tmp_path) == [tag_for(100)]


@pytest.mark.parametrize("saved,world,zero,precision,universal", [
    ((2, 2, "fp32"), 2, 2, "fp32", False),  # same layout: loads as saved
    ((2, 2, "fp32"), 1, 2, "fp32", True),  # fewer ranks
    ((1, 2, "fp32"), 8, 2, "fp32", True),  # more ranks
    ((2, 3, "fp32"), 4, 3, "fp32", True),
    ((2, 1, "bf16"), 2, 2, "bf16", True),  # ZeRO-1 -> ZeRO-2
    ((2, 1, "bf16"), 2, 1, "fp32", True),  # bf16 optimizer -> fp32 optimizer
    ((4, 0, "fp32"), 1, 0, "fp32", False),  # ZeRO-0 is not sharded: any world size as saved
])
def test_resume_plan(tmp_path, saved, world, zero, precision, universal):
    path = fake_checkpoint(tmp_path, 100, world=saved[0], zero=saved[1], precision=saved[2])
    assert needs_universal(path, world, zero, precision, 64) is universal


@pytest.mark.parametrize("saved_zero,zero,match", [(0, 2, "ZeRO-0"), (2, 0, "ZeRO-0"), (2, 3, "ZeRO-3"),
                                                   (3, 1, "ZeRO-1/2")])
def test_resume_plan_refuses_what_deepspeed_cannot_convert(tmp_path, saved_zero, zero, match):
    path = fake_checkpoint(tmp_path, 100, zero=saved_zero)
    with pytest.raises(RecipeError, match=match):
        needs_universal(path, 2, zero, "fp32", 64)


def test_resume_plan_refuses_another_global_batch(tmp_path):
    path = fake_checkpoint(tmp_path, 100, global_batch=64)
    with pytest.raises(RecipeError, match="train.global_batch=64"):
        needs_universal(path, 4, 2, "fp32", 128)
