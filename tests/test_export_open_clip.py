"""``tinyclip-ds export --format open_clip``: open_clip loads the export by itself
(``local-dir:``) and, with its own preprocessing and tokenizer on raw PIL images and strings,
gives the trained student's embeddings; weight sharing is unrolled without changing the
function; what open_clip cannot express is refused by name.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from conftest import launch
from test_teacher_equivalence import open_clip_library, perturb
from tinyclip_ds.cli import main
from tinyclip_ds.config import PROJECT_ROOT, RecipeError
from tinyclip_ds.data.transforms import eval_transform
from tinyclip_ds.export import ExportedStudent, exported_student, load_student_weights, resolve_checkpoint, unroll
from tinyclip_ds.export.open_clip import CONFIG, WEIGHTS, write_open_clip
from tinyclip_ds.export.tinyclip import Consolidated, consolidate, towers_with
from tinyclip_ds.models.config import StudentConfig, StudentTowerConfig, TeacherConfig
from tinyclip_ds.models.students import build_students, shape_record
from tinyclip_ds.models.teachers import load_teacher
from tinyclip_ds.models.transformer import Request
from tinyclip_ds.recipe import load_recipe

TOLERANCE = 1e-5
# A small GELU open_clip teacher (open_clip's own ViT-B configs are GELU), 4 layers per tower so
# that a 2-layer student repeated twice is no deeper than it.
TEACHER = {"embed_dim": 48,
           "vision_cfg": {"image_size": 32, "layers": 4, "width": 64, "head_width": 16, "patch_size": 8},
           "text_cfg": {"context_length": 20, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 4}}
TEXTS = ["a photo of a cat", "Two DOGS   playing in the snow, next to a red car!",
         # longer than the student's 12-token context: truncated, keeping the end token
         "one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen"]


def student_config(repeat: int, **image) -> StudentConfig:
    """Student towers narrower than the teacher, with another MLP ratio and a shorter text context."""
    return StudentConfig(
        image=StudentTowerConfig(**{"width": 32, "layers": 2, "heads": 2, "mlp_ratio": 3.0, "repeat": repeat,
                                    "init": "random", **image}),
        text=StudentTowerConfig(width=32, layers=2, heads=4, mlp_ratio=2.0, repeat=repeat, context_length=12,
                                init="random"))


@pytest.fixture(scope="module")
def teacher_files(tmp_path_factory) -> TeacherConfig:
    """A random-weight open_clip teacher: weights file + model-config JSON."""
    root = tmp_path_factory.mktemp("teacher")
    state = {name: value.contiguous() for name, value in open_clip_library(TEACHER).state_dict().items()}
    save_file(state, root / "teacher.safetensors")
    (root / "teacher.json").write_text(json.dumps(TEACHER))
    return TeacherConfig(source="open_clip", path=str(root / "teacher.safetensors"), model=str(root / "teacher.json"))


def trained_student(teacher_cfg: TeacherConfig, repeat: int, **image) -> tuple[dict, object]:
    """Student towers (kind -> tower) with random-but-fixed perturbations, as training leaves
    them (LayerNorms away from 1/0, per-repeat norms different), and the teacher."""
    teacher = load_teacher(teacher_cfg)
    students = build_students(student_config(repeat, **image), teacher.clip, ["image", "text"], seed=0)
    return {kind: perturb(student.tower, seed=i + 1) for i, (kind, student) in enumerate(students.items())}, teacher


def exported(towers: dict, teacher, logit_scale: float = 42.0) -> ExportedStudent:
    return ExportedStudent(image=unroll(towers["image"]), text=unroll(towers["text"]), logit_scale=logit_scale,
                           teacher=TeacherConfig(source="open_clip"), tokenizer=teacher.tokenizer,
                           image_mean=teacher.image_mean, image_std=teacher.image_std,
                           image_size=towers["image"].shape.image_size, source="test")


def pil_images() -> list[Image.Image]:
    """Raw images of other sizes and aspect ratios than the model's 32×32 (resize and crop run)."""
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, size, dtype=np.uint8)) for size in ((45, 71, 3), (90, 40, 3))]


@torch.no_grad()
def assert_open_clip_matches(directory: Path, towers: dict, teacher, logit_scale: float) -> None:
    """open_clip's model, preprocessing and tokenizer from ``directory`` against our towers with
    our eval transform and the teacher's tokenizer, on raw PIL images and strings."""
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{directory}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{directory}")
    model.eval()
    images = pil_images()
    ours_transform = eval_transform(towers["image"].shape.image_size, teacher.image_mean, teacher.image_std)
    theirs = model.encode_image(torch.stack([preprocess(image) for image in images]))
    ours = towers["image"](torch.stack([ours_transform(image) for image in images])).embedding
    assert (theirs - ours).abs().max().item() <= TOLERANCE
    ids = towers["text"].fit_context(teacher.tokenizer(TEXTS))  # what training and evaluation feed the student
    theirs = model.encode_text(tokenizer(TEXTS))
    ours = towers["text"](ids).embedding
    assert (theirs - ours).abs().max().item() <= TOLERANCE
    assert model.logit_scale.exp().item() == pytest.approx(logit_scale, rel=1e-6)


@pytest.mark.parametrize("repeat", [1, 2])
def test_open_clip_loads_the_export_and_gives_the_students_embeddings(repeat, teacher_files, tmp_path):
    towers, teacher = trained_student(teacher_files, repeat)
    write_open_clip(exported(towers, teacher), tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {CONFIG, WEIGHTS}
    config = json.loads((tmp_path / CONFIG).read_text())
    assert config["model_cfg"]["vision_cfg"]["layers"] == 2 * repeat  # every repeat its own block
    assert config["model_cfg"]["text_cfg"]["context_length"] == 12
    assert_open_clip_matches(tmp_path, towers, teacher, 42.0)


def test_unrolled_towers_compute_the_same_function(teacher_files):
    towers, teacher = trained_student(teacher_files, repeat=2)
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    ids = towers["text"].fit_context(teacher.tokenizer(TEXTS))
    for kind, inputs in (("image", images), ("text", ids)):
        shared = towers[kind].eval()
        plain = unroll(shared)
        assert plain.shape.repeat == 1 and plain.shape.layers == 4 and len(plain.transformer.blocks) == 4
        # independent copies: blocks 0 and 1 were one shared block, now two equal ones
        assert plain.transformer.blocks[0].attn.qkv.weight is not plain.transformer.blocks[1].attn.qkv.weight
        torch.testing.assert_close(plain.transformer.blocks[1].mlp.fc.weight, shared.transformer.blocks[0].mlp.fc.weight)
        # per-repeat norms kept: effective layers 0 and 1 had different LayerNorms
        assert not torch.equal(plain.transformer.norms[0].ln_1.weight, plain.transformer.norms[1].ln_1.weight)
        request = Request(layers=tuple(range(4)), hidden=True)
        with torch.no_grad():
            a, b = shared(inputs, request), plain(inputs, request)
        assert (a.embedding - b.embedding).abs().max().item() <= 1e-6
        for layer in range(4):
            assert (a.hidden[layer] - b.hidden[layer]).abs().max().item() <= 1e-6


def test_what_open_clip_cannot_express_is_refused_by_name(teacher_files, tmp_path):
    towers, teacher = trained_student(teacher_files, repeat=1, output_dim=24)
    with pytest.raises(RecipeError, match=r"^'student\.image\.output_dim' = 24 differs") as error:
        write_open_clip(exported(towers, teacher), tmp_path / "dims")
    assert "\n" not in str(error.value)
    towers, teacher = trained_student(teacher_files, repeat=1)
    demo = exported(towers, teacher)
    demo.teacher = TeacherConfig(source="demo")
    with pytest.raises(RecipeError, match=r"^teacher\.source=demo: .*--format tinyclip$"):
        write_open_clip(demo, tmp_path / "demo")
    assert not (tmp_path / "dims").exists() and not (tmp_path / "demo").exists()


def test_a_stage1_export_pairs_the_student_with_the_teachers_other_tower(teacher_files, tmp_path, capsys):
    towers, teacher = trained_student(teacher_files, repeat=2)
    recipe = load_recipe(PROJECT_ROOT / "recipes/demo/stage1_image.yaml",
                         ["teacher.source=open_clip", f"teacher.path={teacher_files.path}",
                          f"teacher.model={teacher_files.model}"])
    found = Consolidated(path=tmp_path / "step_00000002", recipe=recipe, recipe_text="", step=2, logit_scale=None,
                         shapes={"image": shape_record("image", towers["image"].shape)},
                         weights={f"image.{k}": v for k, v in towers["image"].state_dict().items()})
    student = exported_student(tmp_path, found=found)
    assert "stage-1 checkpoint of the image tower; the export pairs it with the teacher's text tower" in \
        capsys.readouterr().err
    assert student.logit_scale == pytest.approx(teacher.clip.logit_scale.exp().item())
    write_open_clip(student, tmp_path / "out")
    assert_open_clip_matches(tmp_path / "out", {"image": towers["image"], "text": teacher.clip.text}, teacher,
                             student.logit_scale)


@pytest.mark.slow  # 18 s of CPU, about a minute of wall time on a busy 2-core machine
def test_export_command_from_a_run(teacher_files, tmp_path, capsys):
    """A 2-step stage-2 run with an open_clip teacher and a weight-shared image student,
    exported by the CLI, loads in open_clip with the checkpoint's embeddings."""
    run_dir = tmp_path / "run"
    sets = [f"run_dir={run_dir}", "teacher.source=open_clip", f"teacher.path={teacher_files.path}",
            f"teacher.model={teacher_files.model}", "student.image.init_from=", "student.text.init_from=",
            "student.image.layers=2", "student.image.repeat=2", "train.steps=2", "train.micro_batch=4",
            "train.global_batch=8", "train.accumulation=0", "train.warmup_steps=1", "eval.every=0", "eval.data=",
            "eval.zeroshot=", "data.num_workers=0", "checkpoint.every=0"]
    launch("stage2", *[a for s in sets for a in ("--set", s)])
    out = tmp_path / "open_clip"
    cli = subprocess.run([sys.executable, "-m", "tinyclip_ds.cli", "export", str(run_dir), "--format", "open_clip",
                          "--out", str(out)], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert cli.returncode == 0, cli.stderr[-3000:]
    assert f"open_clip export: {out}" in cli.stdout
    # The reference: the checkpoint's own towers, as this library loads them.

    found = consolidate(resolve_checkpoint(run_dir))
    towers = towers_with(found.shapes, found.weights)
    assert towers["image"].shape.repeat == 2
    assert_open_clip_matches(out, towers, load_teacher(teacher_files), found.logit_scale)

    # export-weights is `export --format tinyclip`: the same towers, loadable by this library alone.
    assert main(["export-weights", str(run_dir), "--out", str(tmp_path / "w.safetensors")]) == 0
    _, loaded = load_student_weights(tmp_path / "w.safetensors")
    for kind in ("image", "text"):
        assert all(torch.equal(a, b) for a, b in zip(loaded[kind].state_dict().values(),
                                                     towers[kind].state_dict().values()))
    # MODEL may be a checkpoint directory, which picks no other checkpoint (a one-line error).
    assert main(["export", str(found.path), "--format", "open_clip", "--out", str(tmp_path / "again"),
                 "--checkpoint", "step_00000001"]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "already a checkpoint directory" in error, error
