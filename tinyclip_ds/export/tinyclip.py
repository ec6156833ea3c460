"""``--format tinyclip``: plain fp32 student weights for this library, one safetensors file.

`consolidate` reads a checkpoint (ZeRO shards through DeepSpeed's zero_to_fp32, or a ZeRO-0
checkpoint as saved) and keeps the student towers only (not the distillation projections, not
the stage-1 heads kept in stage 2); every export format starts from it. `export_weights` writes
them with per-tower keys ``image.*`` / ``text.*``, the run's recipe and the full shape of every
student tower in the metadata. `load_student_weights(file)` builds fresh towers of those shapes
and loads the file into them with ``strict=True``: it needs nothing but the file (no teacher,
any working directory).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import yaml
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from tinyclip_ds.config import RecipeError, build
from tinyclip_ds.models.students import Tower, shape_record, student_shapes, tower_from_record
from tinyclip_ds.models.teachers import load_teacher
from tinyclip_ds.recipe import Recipe, load_recipe, validate
from tinyclip_ds.stages import STAGES
from tinyclip_ds.train import checkpoint
from tinyclip_ds.train.consolidate import consolidated_state_dict
from tinyclip_ds.train.records import recipe_of, saved_record


def student_state_dict(engine_state: dict[str, Tensor], stage: str) -> dict[str, Tensor]:
    """The student towers' weights, keyed ``image.*`` / ``text.*``, from the state dict of a
    stage's engine module (stage 1: ``tower.*`` is the one tower; stage 2: ``image.*``, ``text.*``)."""
    prefixes = {prefix: kind + "." for kind, prefix in STAGES[stage].checkpoint_prefixes.items()}
    out = {}
    for name, value in engine_state.items():
        for prefix, renamed in prefixes.items():
            if name.startswith(prefix):
                out[renamed + name[len(prefix):]] = value.float().contiguous()
    return out


@dataclass
class Consolidated:
    """The student towers of one checkpoint as plain fp32 tensors, with what describes them."""
    path: Path                    # the checkpoint directory
    recipe: Recipe
    recipe_text: str              # the recipe.yaml the checkpoint was saved with, verbatim
    shapes: dict[str, dict]       # kind -> `shape_record` of each trained tower
    weights: dict[str, Tensor]    # ``image.*`` / ``text.*``
    logit_scale: float | None     # stage 2's exp(log scale) as training applies it; None for stage 1
    step: int


def consolidate(path: Path) -> Consolidated:
    """The student towers of the complete checkpoint directory ``path``, consolidated to fp32."""
    path = Path(path)
    recipe_path = recipe_of(path)
    if not recipe_path.is_file():
        raise RecipeError(f"{path} has no recipe.yaml beside it or in its run directory, so it is not "
                          f"a checkpoint of a tinyclip-ds run")
    recipe_text = recipe_path.read_text()
    recipe = load_recipe(recipe_path)
    shapes = saved_record(path)["towers"]
    if not shapes:  # saved before checkpoints recorded their shapes: ask the teacher
        shapes = {kind: shape_record(kind, shape)
                  for kind, shape in student_shapes(recipe.student, load_teacher(recipe.teacher).clip,
                                                   recipe.towers).items()}
    engine_state = consolidated_state_dict(path)
    weights = student_state_dict(engine_state, recipe.stage)
    logit_scale = None
    if recipe.stage == "stage2":
        # CLIP's temperature, as the stage-2 module applies it (clamped to [1, logit_scale_max]).
        log_scale = engine_state["logit_scale.log_scale"].float().clamp(0.0, math.log(recipe.loss.logit_scale_max))
        logit_scale = log_scale.exp().item()
    return Consolidated(path=path, recipe=recipe, recipe_text=recipe_text, shapes=shapes, weights=weights,
                        logit_scale=logit_scale, step=int(checkpoint.marker_info(path)["step"]))


def write_tinyclip(found: Consolidated, out: Path) -> Path:
    """Write ``found`` to the safetensors file ``out`` (recipe, shapes, step and logit scale in
    the metadata) after checking that it loads strictly into towers of its shapes."""
    metadata = {"recipe": found.recipe_text, "stage": found.recipe.stage, "students": json.dumps(found.shapes),
                "checkpoint": str(found.path.resolve()), "step": str(found.step)}
    if found.logit_scale is not None:
        metadata["logit_scale"] = json.dumps(found.logit_scale)
    towers_with(found.shapes, found.weights)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(found.weights, str(out), metadata=metadata)
    return out


def export_weights(run_dir: str | Path, which: str = "auto", out: str | Path | None = None) -> Path:
    """Write the student weights of checkpoint ``which`` (a tag, a path, or ``auto`` = the
    newest complete one) of ``run_dir`` to ``out`` (default ``<run_dir>/student_<tag>.safetensors``)
    with the checkpoint's recipe and tower shapes; checks that they load with ``strict=True``
    into towers of those shapes."""
    run_dir = Path(run_dir)
    path = checkpoint.resolve(run_dir, which)
    if path is None:
        raise RecipeError(f"{run_dir} has no complete checkpoint to export")
    if not recipe_of(path).is_file():
        raise RecipeError(f"{run_dir} is not a run directory (no recipe.yaml)")
    return write_tinyclip(consolidate(path), Path(out) if out else run_dir / f"student_{path.name}.safetensors")


def towers_with(shapes: dict[str, dict], weights: dict[str, Tensor]) -> dict[str, Tower]:
    """Fresh towers of ``shapes`` (kind -> `shape_record`) with ``weights`` loaded strictly:
    every tower key present, nothing extra; in eval mode."""
    students = {kind: tower_from_record(kind, record) for kind, record in shapes.items()}
    unexpected = [name for name in weights if name.split(".", 1)[0] not in students]
    if unexpected:
        raise ValueError(f"weights for towers not in the recorded shapes ({', '.join(shapes)}): {unexpected[:5]}")
    for kind, tower in students.items():
        prefix = kind + "."
        tower.load_state_dict({name[len(prefix):]: value for name, value in weights.items()
                               if name.startswith(prefix)}, strict=True)
        tower.eval()
    return students


def load_student_weights(path: str | Path) -> tuple[Recipe, dict[str, Tower]]:
    """``(recipe, {"image": tower, "text": tower})`` from a file written by `export_weights`;
    reads nothing but that file (a file exported before shapes were recorded needs the recipe's
    teacher to know them)."""
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
        weights = {name: f.get_tensor(name) for name in f.keys()}
    if "recipe" not in metadata:
        raise ValueError(f"{path} has no recipe in its metadata; was it written by "
                         f"'tinyclip-ds export --format tinyclip'?")
    recipe = build(Recipe, yaml.safe_load(metadata["recipe"]))
    validate(recipe)
    if "students" in metadata:
        shapes = json.loads(metadata["students"])
    else:
        try:
            teacher = load_teacher(recipe.teacher)
        except RecipeError as err:
            raise RecipeError(f"{path} was exported by an older version that did not record the student "
                              f"shapes, so building its students needs the recipe's teacher: {err}") from None
        shapes = {kind: shape_record(kind, shape)
                  for kind, shape in student_shapes(recipe.student, teacher.clip, recipe.towers).items()}
    return recipe, towers_with(shapes, weights)
