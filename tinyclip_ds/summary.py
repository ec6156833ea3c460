"""A short table of a recipe's teacher and students: sizes, depths, layer maps, inheritance.

Printed by ``tinyclip-ds summary RECIPE`` and at the start of training.
"""

from __future__ import annotations

from torch import nn

from tinyclip_ds.models.students import Student, build_students
from tinyclip_ds.models.teachers import load_teacher
from tinyclip_ds.models.transformer import Clip
from tinyclip_ds.recipe import Recipe


def summarize(recipe: Recipe, teacher_clip: Clip | None = None,
              students: dict[str, Student] | None = None) -> str:
    """The recipe's towers side by side: parameters (and the student/teacher ratio), unique and
    effective depth, width/heads/MLP/output, the distilled layer pairs and what inheritance
    copied. Loads the teacher and builds the students unless they are given."""
    if teacher_clip is None:
        teacher_clip = load_teacher(recipe.teacher).clip
    if students is None:
        students = build_students(recipe.student, teacher_clip, recipe.towers, recipe.seed)
    header = ("tower", "model", "params", "trainable", "ratio", "depth", "unique×repeat", "width",
              "heads", "mlp", "output")
    rows, details = [header], []
    for kind, student in students.items():
        teacher_params = _count(student.teacher)
        for name, tower in (("teacher", student.teacher), ("student", student.tower)):
            s = tower.shape
            rows.append((kind, name, _millions(_count(tower)),
                         _millions(_count(tower, trainable=True)),
                         f"{_count(tower) / teacher_params:.2f}", str(s.depth),
                         f"{s.layers}×{s.repeat}", str(s.width), str(s.heads), str(s.mlp_width),
                         str(s.output_dim)))
        spec = getattr(recipe.student, kind).layer_map
        details.append(f"{kind} distilled layers (student←teacher, layer_map {spec!r}): "
                       + " ".join(f"{s}←{t}" for s, t in student.layer_pairs))
        details += [f"{kind} init: {note}" for note in student.tower.init_notes]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    table = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    source = " ".join(filter(None, (recipe.teacher.source, recipe.teacher.model, recipe.teacher.path)))
    return "\n".join([f"recipe {recipe.name} ({recipe.stage}), teacher {source}",
                      *table, *details])


def _count(module: nn.Module, trainable: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable)


def _millions(n: int) -> str:
    return f"{n / 1e6:.2f}M"
