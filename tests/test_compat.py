"""Checkpoints know what they hold (stage, student tower shapes, parameters): a resume or a
stage-2 ``init_from`` with another stage or student shape is refused by name before anything
is loaded or written, and exported students load from the export alone.

One real 2-step stage-1 run of the demo (its teacher file copied to a scratch folder, so that
it can be taken away) serves every test of this module.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

from conftest import launch
from tinyclip_ds.config import PROJECT_ROOT, RecipeError
from tinyclip_ds.distill.objectives import Stage1Objective
from tinyclip_ds.export import export_weights, load_student_weights
from tinyclip_ds.models.students import build_students, student_shapes
from tinyclip_ds.models.teachers import DEMO_TEACHER_PATH, load_teacher
from tinyclip_ds.recipe import demo_recipe_path, load_recipe
from tinyclip_ds.train import checkpoint
from tinyclip_ds.train.consolidate import consolidated_state_dict
from tinyclip_ds.train.monitor import Monitor
from tinyclip_ds.train.records import RECORD, check_parameters, recipe_of
from tinyclip_ds.train.resume import check_resume, init_source, load_tower
from tinyclip_ds.train.stage1 import Stage1Student

FAST = ["--set", "train.micro_batch=4", "--set", "train.global_batch=8", "--set", "train.accumulation=0",
        "--set", "train.warmup_steps=1", "--set", "train.log_every=1", "--set", "train.steps=2",
        "--set", "train.lr=3e-3", "--set", "eval.every=0", "--set", "eval.data=", "--set", "eval.zeroshot=",
        "--set", "data.num_workers=0"]
ENV = {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def stage1(tmp_path_factory):
    """``(run_dir, teacher file)`` of a 2-step stage1_image demo run (student heads: 4)."""
    root = tmp_path_factory.mktemp("compat")
    teacher = root / "teacher.safetensors"
    shutil.copyfile(DEMO_TEACHER_PATH, teacher)
    run_dir = root / "stage1_image"
    launch("stage1_image", *FAST, "--set", f"run_dir={run_dir}", "--set", f"teacher.path={teacher}")
    return run_dir, teacher


def test_resume_with_another_student_or_stage_is_refused_before_anything_is_written(stage1, tmp_path):
    run_dir, teacher = stage1
    written = {path: path.read_bytes() for path in run_dir.rglob("*") if path.is_file()}
    common = [*FAST, "--set", f"run_dir={run_dir}", "--set", f"teacher.path={teacher}", "--resume", "auto"]

    other_shape = launch("stage1_image", *common, "--set", "student.image.heads=8", "--set", "student.image.layers=2",
                         check=False)
    assert other_shape.returncode == 2 and "Traceback" not in other_shape.stderr, other_shape.stderr[-3000:]
    assert ("was saved by a stage1_image run with student.image.layers=3, student.image.heads=4; this recipe has "
            "student.image.layers=2, student.image.heads=8: resume with the checkpoint's recipe") in other_shape.stderr

    other_stage = launch("stage1_text", *common, check=False)
    assert other_stage.returncode == 2 and "Traceback" not in other_stage.stderr, other_stage.stderr[-3000:]
    assert "was saved by a stage1_image run; this recipe is stage1_text" in other_stage.stderr

    # Same stage and tower shapes, but a loss term with a learned projection: refused once built.
    other_terms = launch("stage1_image", *common, "--set", "loss.emb=1", check=False)
    assert other_terms.returncode == 2 and "Traceback" not in other_terms.stderr, other_terms.stderr[-3000:]
    assert "not in the checkpoint: objective.emb_projection.weight" in other_terms.stderr

    # Nothing of the run changed (recipe.yaml, ds_config.json, no new TensorBoard file), and it still exports.
    # (Not even after a refusal that needed the model built: the run files are written once it loaded.)
    assert {path: path.read_bytes() for path in run_dir.rglob("*") if path.is_file()} == written
    exported = tmp_path / "student.safetensors"
    cli = subprocess.run([sys.executable, "-m", "tinyclip_ds.cli", "export-weights", str(run_dir), "--out",
                          str(exported)], cwd=PROJECT_ROOT, capture_output=True, text=True,
                         env={**os.environ, **ENV}, timeout=300)
    assert cli.returncode == 0 and exported.is_file(), cli.stderr[-3000:]


def initialise_from_stage1(tower, kind: str, cfg, monitor: Monitor) -> None:
    """What a stage-2 run does with ``student.<kind>.init_from``: the resume plan checks it
    against the tower's shape, the task loads it."""
    load_tower(tower, init_source(kind, cfg, tower.shape), monitor.print)


def student_tower(recipe, teacher_clip, kind: str):
    """The ``kind`` student tower the recipe builds."""
    return build_students(recipe.student, teacher_clip, [kind], recipe.seed)[kind].tower


def stage1_module(recipe, teacher_clip) -> Stage1Student:
    """The engine module stage 1 builds for ``recipe`` (as Stage1Task does)."""
    student = build_students(recipe.student, teacher_clip, ["image"], recipe.seed)["image"]
    objective = Stage1Objective(recipe.loss, "image", teacher_clip.visual.shape, student.tower.shape,
                                student.layer_pairs, "student.image")
    return Stage1Student(student.tower, objective)


def test_parameters_of_other_loss_terms_or_frozen_embeddings_are_refused_by_name(stage1):
    run_dir, teacher = stage1
    path = checkpoint.find_checkpoint(run_dir)
    saved = load_recipe(recipe_of(path))
    teacher_clip = load_teacher(saved.teacher).clip
    check_parameters(path, stage1_module(saved, teacher_clip))  # the saving recipe's model fits

    # Same stage and tower shapes, but the embedding loss has a learned projection.
    with_emb = load_recipe(recipe_of(path), ["loss.emb=1"])
    with pytest.raises(RecipeError, match=r"not in the checkpoint: objective\.emb_projection\.weight, "
                                          r"objective\.emb_projection\.bias\): resume with the checkpoint's recipe"):
        check_parameters(path, stage1_module(with_emb, teacher_clip))
    frozen = load_recipe(recipe_of(path), ["student.image.freeze_embed=true"])
    with pytest.raises(RecipeError, match="trainable in one and frozen in the other: tower.class_embedding"):
        check_parameters(path, stage1_module(frozen, teacher_clip))


def test_checkpoints_without_a_record_are_checked_by_their_parameter_shapes(stage1, tmp_path, capsys):
    """Saved by an older version (no student.json): stage and tower shapes from DeepSpeed's file."""
    run_dir, teacher = stage1
    old = tmp_path / "run" / "checkpoints" / "step_00000002"
    shutil.copytree(checkpoint.find_checkpoint(run_dir), old)
    (old / RECORD).unlink()
    recipe = load_recipe(recipe_of(old))
    teacher_clip = load_teacher(recipe.teacher).clip
    check_resume(old, "stage1_image", student_shapes(recipe.student, teacher_clip, recipe.towers))
    with pytest.raises(RecipeError, match="saved by a stage1_image run; this recipe is stage1_text"):
        check_resume(old, "stage1_text", {})
    shallower = load_recipe(recipe_of(old), ["student.image.layers=2"])
    with pytest.raises(RecipeError, match=r"another shape than this recipe's: tower\.transformer\.blocks\.2\."
                                          r"attn\.out\.bias \[64\] \(this recipe: absent\)"):
        check_resume(old, "stage1_image", student_shapes(shallower.student, teacher_clip, shallower.towers))

    # init_from: another depth is a one-line error, not a traceback; heads cannot be told, and it says so.
    monitor = Monitor(tmp_path / "monitor", enabled=True)
    shallower = load_recipe(demo_recipe_path("stage2"), [f"teacher.path={teacher}", f"student.image.init_from={old}",
                                                         "student.image.layers=2"])
    with pytest.raises(RecipeError, match=r"not hold a student\.image tower of this recipe's shape \(Unexpected key"):
        initialise_from_stage1(student_tower(shallower, teacher_clip, "image"), "image", shallower.student.image,
                               monitor)
    more_heads = load_recipe(demo_recipe_path("stage2"), [f"teacher.path={teacher}", f"student.image.init_from={old}",
                                                          "student.image.heads=8"])
    initialise_from_stage1(student_tower(more_heads, teacher_clip, "image"), "image", more_heads.student.image,
                           monitor)
    assert "head count and activation assumed to be this recipe's (student.image.heads=8" in capsys.readouterr().out


def test_init_from_refuses_another_student_shape_by_name(stage1, tmp_path):
    run_dir, teacher = stage1
    overrides = [f"teacher.path={teacher}", f"student.image.init_from={run_dir}"]
    monitor = Monitor(tmp_path, enabled=False)
    # Heads change no parameter shape: only the checkpoint's record tells 4 from 8.
    recipe = load_recipe(demo_recipe_path("stage2"), [*overrides, "student.image.heads=8"])
    teacher_clip = load_teacher(recipe.teacher).clip
    image = student_tower(recipe, teacher_clip, "image")
    with pytest.raises(RecipeError, match=r"'student\.image\.init_from': the stage-1 checkpoint .* was saved with "
                                          r"student\.image\.heads=4; this recipe has student\.image\.heads=8"):
        initialise_from_stage1(image, "image", recipe.student.image, monitor)
    recipe = load_recipe(demo_recipe_path("stage2"), [*overrides, f"student.text.init_from={run_dir}"])
    text = student_tower(recipe, teacher_clip, "text")
    with pytest.raises(RecipeError, match="was saved by a stage1_image run; it takes a stage1_text run"):
        initialise_from_stage1(text, "text", recipe.student.text, monitor)

    # The stage-1 shape loads, and holds the trained weights.
    recipe = load_recipe(demo_recipe_path("stage2"), overrides)
    image = student_tower(recipe, teacher_clip, "image")
    initialise_from_stage1(image, "image", recipe.student.image, monitor)
    trained = consolidated_state_dict(checkpoint.find_checkpoint(run_dir))
    for name, value in image.state_dict().items():
        assert torch.equal(value, trained["tower." + name]), name


def test_exported_students_load_without_the_teacher_from_any_directory(stage1, tmp_path, monkeypatch):
    run_dir, teacher = stage1
    exported = export_weights(run_dir, "auto", tmp_path / "student.safetensors")
    with safe_open(str(exported), framework="pt") as f:
        shapes = json.loads(f.metadata()["students"])
    assert shapes["image"]["heads"] == 4 and shapes["image"]["layers"] == 3 and shapes.keys() == {"image"}

    # The trained student as the run built it (with its teacher) and loaded from the checkpoint.
    recipe = load_recipe(recipe_of(checkpoint.find_checkpoint(run_dir)))
    trained = student_tower(recipe, load_teacher(recipe.teacher).clip, "image").eval()
    state = consolidated_state_dict(checkpoint.find_checkpoint(run_dir))
    trained.load_state_dict({name[len("tower."):]: value for name, value in state.items()
                             if name.startswith("tower.")})
    images = torch.randn(5, 3, trained.shape.image_size, trained.shape.image_size,
                         generator=torch.Generator().manual_seed(0))

    away = tmp_path / "teacher_away.safetensors"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    teacher.rename(away)
    try:
        monkeypatch.chdir(elsewhere)
        _, students = load_student_weights(exported)
    finally:
        away.rename(teacher)
    with torch.no_grad():
        assert torch.equal(students["image"](images).embedding, trained(images).embedding)
