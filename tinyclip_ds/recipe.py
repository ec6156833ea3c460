"""The recipe: one tree of typed configs describing a whole run.

Each section's dataclass lives next to the code it configures; this module assembles them,
loads a YAML recipe (with ``base`` inheritance and ``--set`` overrides) and checks the
cross-section rules that no single section can check on its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import yaml

from tinyclip_ds.config import (PROJECT_ROOT, RecipeError, apply_override, build, load_yaml_tree,
                                option, to_dict)
from tinyclip_ds.data.config import DataConfig
from tinyclip_ds.distill.objectives import LossConfig
from tinyclip_ds.eval.evaluator import EvalConfig
from tinyclip_ds.models.students import StudentConfig
from tinyclip_ds.models.teachers import TeacherConfig
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
    validate(recipe)
    return recipe


def demo_recipe_path(stage: str) -> Path:
    """The embedded default recipe of a stage (the digits demo)."""
    if stage not in STAGES:
        raise RecipeError(f"unknown stage '{stage}'; stages: {', '.join(STAGES)}")
    return PROJECT_ROOT / "recipes" / "demo" / f"{stage}.yaml"


def validate(recipe: Recipe) -> None:
    """Cross-section checks that do not need a model (model-dependent ones run at build time)."""
    train = recipe.train
    for key in ("steps", "micro_batch"):
        if getattr(train, key) < 1:
            raise RecipeError(f"'train.{key}' must be at least 1, got {getattr(train, key)}")
    if train.accumulation < 0 or train.global_batch < 0:
        raise RecipeError("'train.accumulation' and 'train.global_batch' must be >= 0 (0 = derived)")
    if train.warmup_steps < 0:
        raise RecipeError(f"'train.warmup_steps' must be >= 0, got {train.warmup_steps}")
    sources = {"stage1_image": "images", "stage1_text": "captions", "stage2": "pairs"}[recipe.stage]
    if not getattr(recipe.data, sources):
        raise RecipeError(f"a {recipe.stage} recipe needs training data in 'data.{sources}'")
    for tower in recipe.towers:
        cfg = getattr(recipe.student, tower)
        if cfg.layers < 1 or cfg.repeat < 1:
            raise RecipeError(f"'student.{tower}.layers' and 'student.{tower}.repeat' must be >= 1")
    stage1_terms = ("emb", "hidden", "attn_scores", "attn_probs", "attn_relation", "value_relation",
                    "rep_l1", "rep_mse", "rep_cos", "rep_kl", "rep_relation", "vit_kd")
    stage2_terms = ("contrastive", "affinity", "fd", "icl", "filip", "filip_distill")
    weights = {t: getattr(recipe.loss, t) for t in stage1_terms + stage2_terms}
    if any(w < 0 for w in weights.values()):
        bad = [t for t, w in weights.items() if w < 0]
        raise RecipeError(f"loss weights must be >= 0: {', '.join(f'loss.{t}' for t in bad)}")
    if recipe.stage != "stage2":
        wrong = [t for t in stage2_terms if weights[t]]
        if wrong:
            raise RecipeError(f"{', '.join(f'loss.{t}' for t in wrong)} need paired data and both "
                              f"towers: they are stage2 terms, not {recipe.stage} terms")
        if recipe.stage == "stage1_text" and weights["vit_kd"]:
            raise RecipeError("'loss.vit_kd' applies to the image tower only; use it in a stage1_image recipe")
    if weights["rep_relation"] and train.micro_batch < 2:
        raise RecipeError("'loss.rep_relation' compares the samples of a micro-batch with each other: "
                          "'train.micro_batch' must be at least 2")
    if not any(weights.values()):
        raise RecipeError("no loss term is switched on: give at least one 'loss.<term>' a weight > 0")
