"""What a checkpoint says about itself, so that it can be checked without loading a model.

Rank 0 writes beside every checkpoint's shards ``student.json`` (`model_record`: the stage, each
student tower's shape, every parameter's name, shape and trainability) and a copy of the run's
``recipe.yaml``. A resume or a stage-2 ``init_from`` with another stage or student shape is then
refused by name before anything is loaded (`train.resume`), and `check_parameters` compares a
built model's parameters with the checkpoint's before DeepSpeed loads them.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import torch
from torch import nn

from tinyclip_ds.config import RecipeError
from tinyclip_ds.models.students import shape_record
from tinyclip_ds.models.transformer import TextTower, VisionTower
from tinyclip_ds.stages import STAGES

RECORD = "student.json"  # what the checkpoint holds: `model_record`
RECIPE = "recipe.yaml"  # the recipe of the run that saved the checkpoint


def model_record(module: nn.Module) -> dict:
    """What a checkpoint of a stage's engine module holds: the stage (known by where the module
    keeps its towers, the stage table's ``checkpoint_prefixes``), each student tower's
    `shape_record` and every parameter's name, shape and trainability (full shapes also under
    ZeRO-3 partitioning)."""
    towers = {name: child for name, child in module.named_children() if isinstance(child, (VisionTower, TextTower))}
    kinds = {name: "image" if isinstance(tower, VisionTower) else "text" for name, tower in towers.items()}
    stage = next((stage.name for stage in STAGES.values()
                  if {prefix[:-1]: kind for kind, prefix in stage.checkpoint_prefixes.items()} == kinds), None)
    return {"stage": stage,
            "towers": {kinds[name]: shape_record(kinds[name], tower.shape) for name, tower in towers.items()},
            "parameters": {name: {"shape": list(getattr(param, "ds_shape", param.shape)),
                                  "trainable": param.requires_grad}
                           for name, param in module.named_parameters()}}


def saved_record(path: Path) -> dict:
    """The `model_record` of checkpoint ``path``. A checkpoint saved before records existed gets
    what DeepSpeed's model-states file tells: parameter shapes and the stage their names imply,
    no tower shapes (so head count and activation cannot be checked)."""
    path = Path(path)
    if (path / RECORD).is_file():
        return json.loads((path / RECORD).read_text())
    parameters = _parameter_shapes_from_states(path)
    embedding = {"image": "patch_embed.weight", "text": "token_embedding.weight"}
    stage = next((stage.name for stage in STAGES.values()
                  if all(prefix + embedding[kind] in parameters
                         for kind, prefix in stage.checkpoint_prefixes.items())), None)
    return {"stage": stage, "towers": {}, "parameters": parameters}


def _parameter_shapes_from_states(path: Path) -> dict[str, dict]:
    """Parameter shapes from DeepSpeed's model-states file (full tensors up to ZeRO-2, recorded
    shapes under ZeRO-3); empty when there is no readable file, leaving the check to DeepSpeed."""
    files = sorted(path.glob("*mp_rank_00_model_states.pt"))
    if not files:
        return {}
    try:
        states = torch.load(files[0], map_location="cpu", weights_only=True, mmap=True)
    except (OSError, RuntimeError, pickle.UnpicklingError):
        return {}
    buffers = set(states.get("buffer_names") or ())
    shapes = {name: list(value.shape) for name, value in states["module"].items() if name not in buffers}
    for group in [*(states.get("param_shapes") or []), states.get("frozen_param_shapes") or {}]:
        shapes.update({name: list(size) for name, size in group.items()})
    return {name: {"shape": shape} for name, shape in shapes.items()}


def recipe_of(path: Path) -> Path:
    """The recipe a checkpoint was saved with: its own copy, else its run directory's."""
    own = Path(path) / RECIPE
    return own if own.is_file() else Path(path).parent.parent / RECIPE


def check_parameters(path: Path, module: nn.Module) -> None:
    """Refuse (RecipeError) to load checkpoint ``path`` into ``module`` unless it holds exactly
    the module's parameters, with the same shapes and the same ones trainable (the learned parts
    of the loss terms and frozen embeddings depend on the recipe beyond the tower shapes)."""
    saved = saved_record(path)["parameters"]
    if not saved:
        return
    ours = model_record(module)["parameters"]
    problems = []
    if missing := [name for name in ours if name not in saved]:
        problems.append(f"not in the checkpoint: {', '.join(missing[:5])}")
    if extra := [name for name in saved if name not in ours]:
        problems.append(f"only in the checkpoint: {', '.join(extra[:5])}")
    if reshaped := [f"{name} {saved[name]['shape']} (this recipe: {ours[name]['shape']})" for name in ours
                    if name in saved and saved[name]["shape"] != ours[name]["shape"]]:
        problems.append(f"other shapes: {', '.join(reshaped[:5])}")
    if refrozen := [name for name, entry in ours.items()
                    if name in saved and saved[name].get("trainable", entry["trainable"]) != entry["trainable"]]:
        problems.append(f"trainable in one and frozen in the other: {', '.join(refrozen[:5])}")
    if problems:
        raise RecipeError(f"checkpoint {path} does not hold this recipe's model ({'; '.join(problems)}): resume "
                          f"with the checkpoint's recipe ({recipe_of(path)}) or start a new run_dir")
