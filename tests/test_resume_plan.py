"""The resume plan (`tinyclip_ds.train.resume.plan_resume`) decides what a run takes from earlier
runs from the checkpoints' markers and records alone, and refuses what cannot work by name —
before the run directory is touched and before any model is built.

Checkpoints here are what a save leaves for the plan to read (the completion marker and the
record of the module the saving recipe builds), so every refusal is checked in milliseconds;
the tests that save and load real DeepSpeed checkpoints are test_compat, test_checkpoint_faults
and test_resume.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from tinyclip_ds.config import RecipeError
from tinyclip_ds.models.students import student_shapes
from tinyclip_ds.models.teachers import load_teacher
from tinyclip_ds.recipe import demo_recipe_path, load_recipe
from tinyclip_ds.stages import STAGES
from tinyclip_ds.train.checkpoint import MARKER, tag_for
from tinyclip_ds.train.deepspeed_config import build_ds_config
from tinyclip_ds.train.records import RECORD, model_record
from tinyclip_ds.train.resume import check_data, plan_resume
from tinyclip_ds.train.task import task_class


@pytest.fixture(scope="module")
def teacher():
    return load_teacher(load_recipe(demo_recipe_path("stage2")).teacher)


def recipe_of(stage: str, run_dir: Path, *overrides: str):
    """The demo recipe of ``stage`` in ``run_dir``; stage 2 starts from no stage-1 run unless told."""
    towers = ["student.image.init_from=", "student.text.init_from="] if stage == "stage2" else []
    return load_recipe(demo_recipe_path(stage), [f"run_dir={run_dir}", "train.micro_batch=4", "train.global_batch=8",
                                                 "train.accumulation=0", *towers, *overrides])


def save_like_a_run(recipe, teacher, step: int = 4, world: int = 2, zero: int = 2, complete: bool = True) -> Path:
    """The checkpoint directory a run of ``recipe`` leaves at ``step``, as far as the plan reads it."""
    task = task_class(STAGES[recipe.stage]).for_recipe(recipe, teacher, torch.device("cpu"), 0, lambda line: None, {})
    path = recipe.output_dir / "checkpoints" / tag_for(step)
    path.mkdir(parents=True)
    (path / RECORD).write_text(json.dumps(model_record(task.module)))
    if complete:
        (path / MARKER).write_text(json.dumps({"step": step, "world_size": world, "zero_stage": zero,
                                               "precision": "fp32", "global_batch": 8}))
    return path


def plan(recipe, teacher, resume: str | None, world: int = 2, ds_config: str = "zero2_fp32"):
    """`plan_resume` as `train.run.prepare` calls it."""
    config = build_ds_config(ds_config, {}, recipe.train, world, check_accelerator=False)
    shapes = student_shapes(recipe.student, teacher.clip, STAGES[recipe.stage].towers)
    return plan_resume(recipe, resume, world, config, shapes)


def tree(root: Path) -> dict[str, tuple[int, int]]:
    """Every file and folder under ``root`` with its size and modification time."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}


def test_a_fresh_run_and_a_resume_are_planned(tmp_path, teacher):
    recipe = recipe_of("stage1_image", tmp_path / "run")
    fresh = plan(recipe, teacher, None)
    assert (fresh.checkpoint, fresh.universal, fresh.init_from, fresh.notes) == (None, False, {}, ())
    assert plan(recipe, teacher, "auto").notes == (f"--resume auto: no complete checkpoint in {recipe.output_dir}; "
                                                   f"starting fresh",)

    path = save_like_a_run(recipe, teacher)
    same = plan(recipe, teacher, "auto")
    assert (same.checkpoint, same.universal, same.saved["step"]) == (path, False, 4)
    assert same.notes == (f"resuming from {path} (saved by 2 rank(s) with ZeRO-2; loaded as saved)",)
    fewer_ranks = plan(recipe, teacher, tag_for(4), world=1)
    assert (fewer_ranks.checkpoint, fewer_ranks.universal) == (path, True)
    assert "converted once to DeepSpeed's universal format" in fewer_ranks.notes[0]


def test_a_stage2_plan_names_the_stage1_checkpoints_and_ignores_them_when_resuming(tmp_path, teacher):
    image_run = tmp_path / "stage1_image"
    stage1 = save_like_a_run(recipe_of("stage1_image", image_run), teacher)
    recipe = recipe_of("stage2", tmp_path / "run", f"student.image.init_from={image_run}",
                       f"student.text.init_from={tmp_path / 'nothing'}", "student.text.init_from_missing=init")
    fresh = plan(recipe, teacher, None)
    assert set(fresh.init_from) == {"image", "text"}
    assert (fresh.init_from["image"].path, fresh.init_from["image"].shape_recorded) == (stage1, True)
    assert (fresh.init_from["text"].path, fresh.init_from["text"].fallback) == (None, "inherit")

    save_like_a_run(recipe, teacher)
    stage1.joinpath(MARKER).unlink()  # init_from would now be refused: a resume does not read it
    assert plan(recipe, teacher, "auto").init_from == {}
    with pytest.raises(RecipeError, match="'student.image.init_from' = .*: no complete checkpoint there"):
        plan(recipe_of("stage2", tmp_path / "other", f"student.image.init_from={image_run}",
                       "student.image.init_from_missing=error"), teacher, None)


REFUSALS = {
    "checkpoints, no --resume": ("stage1_image", [], None, {},
                                 r"already holds checkpoints \(newest: step_00000004\); pass --resume auto"),
    "incomplete": ("stage1_image", [], "step_00000006", {}, r"step_00000006 is incomplete \(no COMPLETE marker"),
    "no such tag": ("stage1_image", [], "step_00000008", {}, r"checkpoint 'step_00000008': no checkpoint directory"),
    "another stage": ("stage1_text", [], "SAVED", {}, r"was saved by a stage1_image run; this recipe is stage1_text"),
    "another shape": ("stage1_image", ["student.image.heads=8"], "auto", {},
                      r"saved by a stage1_image run with student\.image\.heads=4; "
                      r"this recipe has student\.image\.heads=8"),
    "another global batch": ("stage1_image", ["train.global_batch=16"], "auto", {},
                             r"global batch of 8 samples per step, this launch has 16"),
    "another ZeRO family": ("stage1_image", [], "auto", {"ds_config": "zero0_fp32"},
                            r"cannot move a checkpoint from ZeRO-1/2 to ZeRO-0"),
    "init_from of another tower": ("stage2", ["student.text.init_from=STAGE1"], None, {},
                                   r"'student\.text\.init_from' = .*stage1_image run; it takes a stage1_text run"),
    "init_from of another shape": ("stage2", ["student.image.init_from=STAGE1", "student.image.heads=8"], None, {},
                                   r"the stage-1 checkpoint .* was saved with student\.image\.heads=4; this recipe "
                                   r"has student\.image\.heads=8"),
}


@pytest.mark.parametrize("case", REFUSALS)
def test_refusals_name_the_problem_and_write_nothing(case, tmp_path, teacher):
    stage, overrides, resume, options, message = REFUSALS[case]
    saving = recipe_of("stage1_image", tmp_path / "saved")
    saved = save_like_a_run(saving, teacher)
    save_like_a_run(saving, teacher, step=6, complete=False)  # a save that never finished
    run_dir = saving.output_dir if stage == "stage1_image" else tmp_path / "new"
    overrides = [o.replace("STAGE1", str(saving.output_dir)) for o in overrides]
    recipe = recipe_of(stage, run_dir, *overrides)
    before = tree(tmp_path)
    with pytest.raises(RecipeError, match=message):
        plan(recipe, teacher, str(saved) if resume == "SAVED" else resume, **options)
    assert tree(tmp_path) == before


def test_the_data_a_position_counts_in_must_be_the_same():
    check_data([10, 5], [2.0, 1.0], 3, [10, 5], [2.0, 1.0], 3)
    for sizes, weights, seed in (([10, 6], [2.0, 1.0], 3), ([10, 5], [], 3), ([10, 5], [2.0, 1.0], 4)):
        with pytest.raises(RecipeError, match=re.escape(
                f"the training data changed since the checkpoint: its sources held [10, 5] samples with "
                f"data.weights [2.0, 1.0] and seed 3, now {sizes} with {weights or '[]'} and seed {seed}")):
            check_data([10, 5], [2.0, 1.0], 3, sizes, weights, seed)
