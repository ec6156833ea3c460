"""``tinyclip-ds export``: a trained student in a format other libraries load by themselves.

MODEL is a run directory (its newest complete checkpoint, or ``--checkpoint TAG``) or a
checkpoint directory. Every format starts from the same consolidated fp32 student towers
(`tinyclip.consolidate`); ``open_clip`` and ``hf`` then get an `ExportedStudent`, the student
with its weight sharing unrolled (`unroll.unroll`) and what loading it alone needs (tokenizer,
image normalisation, logit scale), and write their own layout:

- ``tinyclip``: one safetensors file for this library (`load_student_weights`); what
  ``tinyclip-ds export-weights`` writes, which is an alias of this format.
- ``open_clip``: a directory ``open_clip.create_model_and_transforms("local-dir:DIR")`` and
  ``open_clip.get_tokenizer("local-dir:DIR")`` load (`open_clip.write_open_clip`).
- ``hf``: a transformers ``CLIPModel`` + ``CLIPProcessor`` directory (`hf.write_hf`).

A stage-1 run trained one tower; its export pairs the student tower with the teacher's other
tower (the model stage 1 evaluates), and says so.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from tinyclip_ds.config import RecipeError
from tinyclip_ds.export.tinyclip import (Consolidated, consolidate, export_weights, load_student_weights,
                                         student_state_dict, towers_with, write_tinyclip)
from tinyclip_ds.export.unroll import unroll
from tinyclip_ds.models.config import TeacherConfig
from tinyclip_ds.models.teachers import load_teacher
from tinyclip_ds.models.transformer import TextTower, VisionTower
from tinyclip_ds.progress import progress
from tinyclip_ds.train import checkpoint
from tinyclip_ds.train.records import RECIPE

__all__ = ["FORMATS", "ExportedStudent", "export", "export_weights", "exported_student", "load_student_weights",
           "resolve_checkpoint", "student_state_dict", "towers_with", "unroll"]

FORMATS = ("open_clip", "hf", "tinyclip")


@dataclass
class ExportedStudent:
    """A trained student, unrolled, with what a format needs to load it alone."""
    image: VisionTower          # fp32, eval mode, weight sharing unrolled (repeat == 1)
    text: TextTower             # fp32, eval mode, weight sharing unrolled
    logit_scale: float          # exp(log scale) of stage 2; the teacher's for a stage-1 run
    teacher: TeacherConfig      # the run's teacher (tokenizer family: demo word tokenizer vs CLIP BPE)
    tokenizer: Callable         # the teacher's tokenizer object (ClipTokenizer / HfClipTokenizer / WordTokenizer)
    image_mean: tuple
    image_std: tuple
    image_size: int
    source: str                 # the checkpoint it came from (for messages)


def resolve_checkpoint(model: str | Path, which: str = "auto") -> Path:
    """The complete checkpoint directory MODEL names: MODEL itself when it is one, else the run
    directory MODEL's checkpoint ``which`` (a tag, a path, or ``auto`` = the newest complete one)."""
    model = Path(model)
    if not model.is_dir():
        raise RecipeError(f"{model} does not exist or is not a directory: give a run directory or a "
                          f"checkpoint directory (RUN/checkpoints/step_...)")
    if checkpoint.is_complete(model) or model.parent.name == "checkpoints":
        if which not in ("auto", "", str(model)):
            raise RecipeError(f"--checkpoint {which}: {model} is already a checkpoint directory; "
                              f"give its run directory to pick another checkpoint")
        return checkpoint.resolve(model.parent.parent, str(model))  # refuses an incomplete one
    path = checkpoint.resolve(model, which or "auto")
    if path is None:
        if not (model / RECIPE).is_file():
            raise RecipeError(f"{model} is neither a run directory (no recipe.yaml) nor a checkpoint directory")
        raise RecipeError(f"{model} has no complete checkpoint to export yet (runs save one every "
                          f"checkpoint.every steps and at the end)")
    return path


def exported_student(model: str | Path, checkpoint: str = "auto",
                     found: Consolidated | None = None) -> ExportedStudent:
    """The student of MODEL's checkpoint, unrolled, with its teacher's tokenizer and image
    normalisation (the teacher is loaded for those, and for a stage-1 run's other tower)."""
    found = found or consolidate(resolve_checkpoint(model, checkpoint))
    recipe = found.recipe
    # fp32 whatever precision the run computed the teacher in: its tower may become part of the export.
    teacher = load_teacher(dataclasses.replace(recipe.teacher, precision="fp32"))
    towers = towers_with(found.shapes, found.weights)
    logit_scale = found.logit_scale
    if logit_scale is None:  # stage 1: one trained tower, the teacher's for the other and its temperature
        (trained,) = towers
        other = "text" if trained == "image" else "image"
        teacher_tower = teacher.clip.visual if other == "image" else teacher.clip.text
        student_dim, teacher_dim = towers[trained].shape.output_dim, teacher_tower.shape.output_dim
        if student_dim != teacher_dim:
            raise RecipeError(f"student.{trained}.output_dim = {student_dim}: a stage-1 export pairs the "
                              f"student {trained} tower with the teacher's {other} tower, whose embeddings have "
                              f"{teacher_dim} dimensions; export the stage-2 run that trains both towers")
        towers[other] = teacher_tower
        logit_scale = teacher.clip.logit_scale.exp().item()
        print(f"export: {found.path} is a stage-1 checkpoint of the {trained} tower; the export pairs it with "
              f"the teacher's {other} tower and logit scale ({recipe.teacher.source} teacher)", file=sys.stderr)
    return ExportedStudent(image=unroll(towers["image"]), text=unroll(towers["text"]), logit_scale=float(logit_scale),
                           teacher=recipe.teacher, tokenizer=teacher.tokenizer, image_mean=teacher.image_mean,
                           image_std=teacher.image_std, image_size=towers["image"].shape.image_size,
                           source=str(found.path))


def export(model: str | Path, format: Literal["open_clip", "hf", "tinyclip"], out: str | Path,
           checkpoint: str = "auto") -> Path:
    """Export MODEL's checkpoint in ``format`` to ``out`` (a directory; for ``tinyclip`` a
    ``.safetensors`` file, or a directory that gets ``student_<tag>.safetensors``); returns
    what was written."""
    if format not in FORMATS:
        raise RecipeError(f"--format {format!r}: expected one of {', '.join(FORMATS)}")
    out = Path(out)
    path = resolve_checkpoint(model, checkpoint)
    steps = 2 if format == "tinyclip" else 3
    with progress(total=steps, desc=f"export {format}", unit="step") as bar:
        bar.set_postfix_str("consolidating the checkpoint")
        found = consolidate(path)
        bar.update()
        if format == "tinyclip":
            bar.set_postfix_str("writing")
            target = out if out.suffix == ".safetensors" else out / f"student_{path.name}.safetensors"
            written = write_tinyclip(found, target)
            bar.update()
            return written
        bar.set_postfix_str("unrolling, loading the teacher's tokenizer")
        student = exported_student(model, checkpoint, found=found)
        bar.update()
        bar.set_postfix_str(f"writing and checking the {format} model")
        if format == "open_clip":
            from tinyclip_ds.export.open_clip import write_open_clip

            write_open_clip(student, out)
        else:
            from tinyclip_ds.export.hf import write_hf

            write_hf(student, out)
        bar.update()
    return out
