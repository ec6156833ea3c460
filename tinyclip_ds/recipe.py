"""The recipe: one tree of typed configs describing a whole run.

Each section's dataclass lives next to the code it configures; this module assembles them,
loads a YAML recipe (with ``base`` inheritance and ``--set`` overrides) and checks the
cross-section rules that no single section can check on its own.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Literal

import yaml

from tinyclip_ds.config import (PROJECT_ROOT, Range, RecipeError, apply_override, build, load_yaml_tree,
                                option, origin_of, to_dict)
from tinyclip_ds.data import mixture, sources
from tinyclip_ds.data.config import DataConfig
from tinyclip_ds.distill.objectives import LossConfig
from tinyclip_ds.distill.terms import TERMS
from tinyclip_ds.eval.evaluator import EvalConfig, check_images, resolve_templates
from tinyclip_ds.models.students import StudentConfig
from tinyclip_ds.models.teachers import TeacherConfig, check_openai_options
from tinyclip_ds.train.checkpoint import CheckpointConfig
from tinyclip_ds.train.optim import TrainConfig

STAGES = ("stage1_image", "stage1_text", "stage2")


@dataclass
class Recipe:
    name: str = option("", "run name; '' = the recipe file's name")
    stage: Literal["stage1_image", "stage1_text", "stage2"] = option(
        "stage1_image", "what is trained: the image tower alone, the text tower alone, or both jointly")
    run_dir: str = option("", "where logs, metrics, checkpoints and the resolved recipe go; "
                              "'' = runs/<name>/")
    seed: int = option(0, "seed of initialisation, data order and augmentation")
    teacher: TeacherConfig = option(TeacherConfig(), "the frozen teacher")
    student: StudentConfig = option(StudentConfig(), "the student towers")
    data: DataConfig = option(DataConfig(), "training data")
    loss: LossConfig = option(LossConfig(), "loss terms and their weights")
    train: TrainConfig = option(TrainConfig(), "optimisation")
    eval: EvalConfig = option(EvalConfig(), "evaluation during training")
    checkpoint: CheckpointConfig = option(CheckpointConfig(), "checkpointing")
    ds_config: str = option("zero0_fp32", "DeepSpeed config: a name in ds_configs/ or a path to a JSON file")
    deepspeed: dict = option({}, "overrides of individual DeepSpeed config keys, "
                                 "e.g. --set deepspeed.zero_optimization.stage=3")

    @property
    def output_dir(self) -> Path:
        return Path(self.run_dir or Path("runs") / self.name)

    @property
    def towers(self) -> tuple[str, ...]:
        """The student towers this stage trains."""
        return {"stage1_image": ("image",), "stage1_text": ("text",), "stage2": ("image", "text")}[self.stage]

    def to_yaml(self) -> str:
        return yaml.safe_dump(to_dict(self), sort_keys=False)


def load_recipe(path: str | Path | None, overrides: list[str] = (), stage: str | None = None) -> Recipe:
    """Load, override and validate a recipe; errors are `RecipeError` with precise messages.

    ``stage`` (given by a stage launcher) selects the stage's demo recipe when ``path`` is
    None and must agree with the recipe's own ``stage`` otherwise.
    """
    if path is None:
        if stage is None:
            raise RecipeError("no recipe given: pass a recipe file")
        path = demo_recipe_path(stage)
    path = Path(path)
    tree, origins = load_yaml_tree(path)
    for assignment in overrides:
        apply_override(tree, origins, Recipe, assignment)
    recipe = build(Recipe, tree, origins)
    if not recipe.name:
        recipe.name = path.stem if path.parent.name in ("", ".", "recipes") else f"{path.parent.name}_{path.stem}"
    if stage is not None and recipe.stage != stage:
        raise RecipeError(f"{path} is a '{recipe.stage}' recipe but this launcher runs '{stage}'; "
                          f"use launch/{recipe.stage}.sh or pick a {stage} recipe")
    validate(recipe, origins)
    return recipe


def demo_recipe_path(stage: str) -> Path:
    """The embedded default recipe of a stage (the digits demo)."""
    if stage not in STAGES:
        raise RecipeError(f"unknown stage '{stage}'; stages: {', '.join(STAGES)}")
    return PROJECT_ROOT / "recipes" / "demo" / f"{stage}.yaml"


_AT_LEAST_0, _AT_LEAST_1, _POSITIVE = Range(0), Range(1), Range(0, open_low=True)
_TEACHERS = Range(0, note="0 = the teacher's")
_TOWER_RANGES = {
    "width": _TEACHERS, "layers": _AT_LEAST_1, "heads": _TEACHERS, "mlp_ratio": _POSITIVE,
    "repeat": _AT_LEAST_1, "patch_size": _TEACHERS, "context_length": _TEACHERS, "output_dim": _TEACHERS,
    "dropout": Range(0, 1, open_high=True),
}
RANGES: dict[str, Range] = {
    "seed": Range(0, 2**63 - 1),
    "teacher.image_heads": Range(0, note="0 = width / 64"),
    "teacher.text_heads": Range(0, note="0 = width / 64"),
    **{f"student.{tower}.{key}": rule for tower in ("image", "text") for key, rule in _TOWER_RANGES.items()},
    "data.randaugment_ops": _AT_LEAST_0,
    "data.randaugment_magnitude": Range(0, 30),
    "data.num_workers": Range(0, note="0 = load in the training process"),
    "data.max_caption_chars": _AT_LEAST_1,
    **{f"loss.{term}": Range(0, note="0 = off") for term in TERMS},
    "loss.rep_kl_temperature": _POSITIVE,
    "loss.rep_relation_temperature": _POSITIVE,
    "loss.relation_heads": Range(0, note="0 = the teacher's heads"),
    "loss.vit_kd_alpha": _AT_LEAST_0,
    "loss.vit_kd_beta": _AT_LEAST_0,
    "loss.vit_kd_mask_ratio": Range(0, 1, open_high=True),
    "loss.vit_kd_shallow_layers": _AT_LEAST_0,
    "loss.logit_scale_init": _POSITIVE,
    "loss.logit_scale_max": _POSITIVE,
    "loss.affinity_logit_scale": _POSITIVE,
    "loss.filip_topk": Range(0, note="0 = all"),
    "loss.filip_chunk": _AT_LEAST_1,
    "train.steps": _AT_LEAST_1,
    "train.micro_batch": _AT_LEAST_1,
    "train.accumulation": Range(0, note="0 = derived"),
    "train.global_batch": Range(0, note="0 = derived"),
    "train.lr": _AT_LEAST_0,
    "train.min_lr": _AT_LEAST_0,
    "train.warmup_steps": _AT_LEAST_0,
    "train.weight_decay": _AT_LEAST_0,
    "train.beta1": Range(0, 1, open_high=True),
    "train.beta2": Range(0, 1, open_high=True),
    "train.eps": _POSITIVE,
    "train.log_every": _AT_LEAST_1,
    "train.max_nonfinite": _AT_LEAST_1,
    "train.max_unusable": _AT_LEAST_1,
    "eval.every": Range(0, note="0 = at the end only"),
    "eval.batch_size": _AT_LEAST_1,
    "eval.heatmap_size": _AT_LEAST_1,
    "checkpoint.every": Range(0, note="0 = at the end only"),
    "checkpoint.keep_last": Range(0, note="0 = keep all"),
}
"""The values every numeric recipe field accepts (a float must also be finite)."""


def numeric_fields(obj: object, prefix: str = "") -> list[tuple[str, float]]:
    """``(dotted key, value)`` of every int and float field of a config tree."""
    found = []
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(hints[f.name]):
            found += numeric_fields(value, f"{prefix}{f.name}.")
        elif hints[f.name] in (int, float):
            found.append((prefix + f.name, value))
    return found


def validate(recipe: Recipe, origins: dict | None = None) -> None:
    """Every check that needs neither files nor a model: value ranges and cross-section rules
    (file checks are `check_paths` and `check_run_dir`; model-dependent ones run at build time)."""
    origins = origins or {}
    for key, value in numeric_fields(recipe):
        rule = RANGES.get(key, Range())
        if value not in rule:
            finite = "a finite number " if isinstance(value, float) else ""
            raise RecipeError(f"'{key}' ({origin_of(key, origins)}) must be {finite}{rule}, got {value!r}")
    check_openai_options(recipe.teacher)
    train = recipe.train
    if train.min_lr > train.lr:
        raise RecipeError(f"'train.min_lr' ({train.min_lr}) is above 'train.lr' ({train.lr}); "
                          f"the schedule decays from lr to min_lr")
    if recipe.loss.logit_scale_init > recipe.loss.logit_scale_max:
        raise RecipeError(f"'loss.logit_scale_init' ({recipe.loss.logit_scale_init}) is above "
                          f"'loss.logit_scale_max' ({recipe.loss.logit_scale_max})")
    name = PurePath(recipe.name)
    if name.is_absolute() or ".." in name.parts or not name.parts:
        raise RecipeError(f"'name' = {recipe.name!r} ({origin_of('name', origins)}) must be a plain run "
                          f"name (the run goes to runs/<name>/), not a path out of runs/; to put the "
                          f"run elsewhere set 'run_dir'")
    data_key = {"stage1_image": "images", "stage1_text": "captions", "stage2": "pairs"}[recipe.stage]
    if not getattr(recipe.data, data_key):
        raise RecipeError(f"a {recipe.stage} recipe needs training data in 'data.{data_key}'")
    mixture.check_weights(recipe.data, data_key)
    weights = {name: getattr(recipe.loss, name) for name in TERMS}
    if recipe.stage != "stage2":
        wrong = [name for name, term in TERMS.items() if term.stage == "stage2" and weights[name]]
        if wrong:
            raise RecipeError(f"{', '.join(f'loss.{t}' for t in wrong)} need paired data and both "
                              f"towers: they are stage2 terms, not {recipe.stage} terms")
        for name, term in TERMS.items():
            if weights[name] and recipe.towers[0] not in term.towers:
                raise RecipeError(f"'loss.{name}' applies to the {' and '.join(term.towers)} tower only; "
                                  f"use it in a stage1_{term.towers[0]} recipe")
    for name, term in TERMS.items():
        if weights[name] and term.in_batch and train.micro_batch < 2:
            raise RecipeError(f"'loss.{name}' compares the samples of a micro-batch with each other: "
                              f"'train.micro_batch' must be at least 2")
    if not any(weights.values()):
        raise RecipeError("no loss term is switched on: give at least one 'loss.<term>' a weight > 0")


def check_run_dir(recipe: Recipe) -> None:
    """Refuse a run directory that cannot hold the run: a file, under a file, or not writable."""
    key = "run_dir" if recipe.run_dir else "name"
    target = recipe.output_dir.absolute()
    existing = next(p for p in (target, *target.parents) if p.exists())
    if not existing.is_dir():
        where = "is a file" if existing == target else f"is inside {existing}, which is a file"
        raise RecipeError(f"'{key}': the run directory {target} {where}; set 'run_dir' to a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise RecipeError(f"'{key}': the run directory {target} cannot be written ({existing} is not "
                          f"writable by this user); set 'run_dir' to a writable place")


def check_paths(recipe: Recipe) -> None:
    """Check that every file and folder the recipe reads exists and is readable: the teacher's
    files, the stage's training data, the evaluation sets and ``init_from`` (what ``check``
    does unless --no-paths). Raises a RecipeError naming the key and the path."""
    _check_teacher_paths(recipe.teacher)
    data, evaluation = recipe.data, recipe.eval
    name = {"stage1_image": "images", "stage1_text": "captions", "stage2": "pairs"}[recipe.stage]
    # Building a source indexes it, which is the check. The shipped demo:* data has no path
    # (and takes seconds to build).
    specs = getattr(data, name)
    for i, spec in enumerate(specs):
        if _is_path(spec):
            mixture.read_part(spec, name, data, key=f"data.{name}[{i}]")
    # Evaluation sets are checked as a run checks them at its start: every image decoded.
    if _is_path(evaluation.data):
        check_images(mixture.retrieval_pairs(evaluation.data, evaluation.image_root, data,
                                             split=evaluation.split)[0], "eval.data")
    if _is_path(evaluation.zeroshot):
        check_images(sources.classification_source(evaluation.zeroshot)[0], "eval.zeroshot")
    if evaluation.zeroshot and evaluation.templates != "default":
        resolve_templates(evaluation.templates, None)
    if recipe.stage == "stage2":
        for tower in recipe.towers:
            cfg = getattr(recipe.student, tower)
            if cfg.init_from and cfg.init_from_missing == "error":
                _require(f"student.{tower}.init_from", Path(cfg.init_from),
                         "a stage-1 run directory or checkpoint directory", directory=True)


def _is_path(spec: str) -> bool:
    """Whether a data spec names a file or folder (not '' and not the shipped demo:* data)."""
    return bool(spec) and not spec.startswith("demo:")


def _check_teacher_paths(teacher: TeacherConfig) -> None:
    """The teacher's weights (and, for HF directories, config and tokenizer files)."""
    if teacher.source == "demo" and not teacher.path:
        return  # the shipped weights
    if not teacher.path:
        raise RecipeError(f"'teacher.path': the {teacher.source} source needs the teacher's weights")
    path = Path(teacher.path)
    if teacher.source == "hf":
        _require("teacher.path", path, "a Hugging Face CLIPModel directory", directory=True)
        _require("teacher.path", path / "config.json", "a directory written by save_pretrained")
        weights = [path / f"{name}{suffix}" for name in ("model.safetensors", "pytorch_model.bin")
                   for suffix in ("", ".index.json")]
        if not any(p.is_file() for p in weights):
            raise RecipeError(f"'teacher.path': {path} has no weights (model.safetensors or "
                              f"pytorch_model.bin, or their .index.json shards)")
        if not ((path / "tokenizer.json").is_file()
                or (path / "vocab.json").is_file() and (path / "merges.txt").is_file()):
            raise RecipeError(f"'teacher.path': {path} has no tokenizer files (tokenizer.json, or "
                              f"vocab.json + merges.txt); save the tokenizer there with save_pretrained")
        return
    if teacher.source == "open_clip":
        if teacher.model.endswith(".json"):
            _require("teacher.model", Path(teacher.model), "an open_clip model-config JSON")
        if not path.exists() and _is_open_clip_tag(teacher.model, teacher.path):
            return  # a pretrained tag: open_clip finds it in its cache or downloads it
    _require("teacher.path", path, "the teacher's weights file")


def _is_open_clip_tag(model: str, tag: str) -> bool:
    """Whether ``tag`` names one of open_clip's pretrained weights of ``model``."""
    import open_clip

    return "/" not in tag and bool(open_clip.get_pretrained_cfg(model, tag))


def _require(key: str, path: Path, fix: str, directory: bool = False) -> None:
    """A RecipeError naming ``key`` unless ``path`` is a readable file (or directory)."""
    if not path.exists():
        raise RecipeError(f"'{key}': {path} does not exist; give {fix}")
    if path.is_dir() != directory:
        kind, wanted = ("file", "directory") if directory else ("directory", "file")
        raise RecipeError(f"'{key}': {path} is a {kind}, not a {wanted}; give {fix}")
    if not os.access(path, os.R_OK | (os.X_OK if directory else 0)):
        raise RecipeError(f"'{key}': {path} cannot be read by this user")
