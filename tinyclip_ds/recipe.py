"""The recipe: one tree of typed configs describing a whole run.

Each section's dataclass lives next to the code it configures, in that package's torch-free
``config`` module, and declares each field's default, help and valid range; this module
assembles them, loads a YAML recipe (with ``base`` inheritance and ``--set`` overrides) and
checks the cross-section rules that no single section can check on its own. Loading and
validating a recipe imports neither torch nor DeepSpeed nor the model code
(tests/test_check_imports.py); only the file checks of `check_paths` may.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path, PurePath

import yaml

from tinyclip_ds.config import (PROJECT_ROOT, Range, RecipeError, apply_override, build, check_ranges,
                                load_yaml_tree, option, origin_of, to_dict)
from tinyclip_ds.data import mixture, sources
from tinyclip_ds.data.config import DataConfig
from tinyclip_ds.distill.config import TERMS, LossConfig
from tinyclip_ds.eval.config import EvalConfig
from tinyclip_ds.models.config import StudentConfig, TeacherConfig, check_openai_options
from tinyclip_ds.stages import STAGES
from tinyclip_ds.train.config import CheckpointConfig, TrainConfig


@dataclass
class Recipe:
    name: str = option("", "run name; '' = the recipe file's name")
    stage: str = option("stage1_image", "what is trained: " + "; ".join(f"{name}, {stage.help}"
                                                                         for name, stage in STAGES.items()),
                        choices=tuple(STAGES))
    run_dir: str = option("", "where logs, metrics, checkpoints and the resolved recipe go; "
                              "'' = runs/<name>/")
    seed: int = option(0, "seed of initialisation, data order and augmentation", range=Range(0, 2**63 - 1))
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
        return STAGES[self.stage].towers

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
                          f"use {STAGES[recipe.stage].launcher} or pick a {stage} recipe")
    validate(recipe, origins)
    return recipe


def demo_recipe_path(stage: str) -> Path:
    """The embedded default recipe of a stage (the digits demo)."""
    if stage not in STAGES:
        raise RecipeError(f"unknown stage '{stage}'; stages: {', '.join(STAGES)}")
    return PROJECT_ROOT / "recipes" / "demo" / f"{stage}.yaml"


def validate(recipe: Recipe, origins: dict | None = None) -> None:
    """Every check that needs neither files nor a model: value ranges and cross-section rules
    (file checks are `check_paths` and `check_run_dir`; model-dependent ones run at build time)."""
    origins = origins or {}
    check_ranges(recipe, origins)
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
    stage = STAGES[recipe.stage]
    if not getattr(recipe.data, stage.data):
        raise RecipeError(f"a {recipe.stage} recipe needs training data in 'data.{stage.data}'")
    mixture.check_weights(recipe.data, stage.data)
    weights = {name: getattr(recipe.loss, name) for name in TERMS}
    wrong = [name for name, term in TERMS.items() if weights[name] and term.stage not in stage.term_stages]
    if wrong:
        raise RecipeError(f"{', '.join(f'loss.{t}' for t in wrong)} need paired data and both "
                          f"towers: they are stage2 terms, not {recipe.stage} terms")
    for name, term in TERMS.items():
        if weights[name] and not set(term.towers) & set(stage.towers):
            fitting = [other.name for other in STAGES.values()
                       if set(other.towers) <= set(term.towers) and term.stage in other.term_stages]
            raise RecipeError(f"'loss.{name}' applies to the {' and '.join(term.towers)} tower only; "
                              f"use it in a {' or '.join(fitting)} recipe")
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
    from tinyclip_ds.eval.evaluator import check_images, resolve_templates  # torch: the full check only

    _check_teacher_paths(recipe.teacher)
    data, evaluation = recipe.data, recipe.eval
    name = STAGES[recipe.stage].data
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
    if STAGES[recipe.stage].reads_init_from:
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
