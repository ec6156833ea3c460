"""The stage table (`tinyclip_ds.stages`) is what a stage is: every row declares everything that
recipe validation, path checks, the training loop, checkpoints and the launchers read, and its
task — built alone, without a run — keeps its towers where the row says."""

from __future__ import annotations

import dataclasses
import inspect
import re

import pytest
import torch

from tinyclip_ds.config import PROJECT_ROOT, RecipeError
from tinyclip_ds.data.config import DataConfig
from tinyclip_ds.distill.config import TERMS
from tinyclip_ds.models.teachers import load_teacher
from tinyclip_ds.recipe import Recipe, demo_recipe_path, load_recipe
from tinyclip_ds.stages import STAGES, Stage
from tinyclip_ds.train.records import model_record
from tinyclip_ds.train.task import Task, task_class

TASK_METHODS = [name for name in vars(Task) if not name.startswith("_") and callable(getattr(Task, name))]


def stage_problems(stage: Stage) -> list[str]:
    """What is missing or wrong in one row of the table, one line each."""
    problems = [f"{stage.name or '?'}: '{f.name}' is not declared" for f in dataclasses.fields(stage)
                if f.type != "bool" and not getattr(stage, f.name)]
    if not set(stage.towers) <= {"image", "text"}:
        problems.append(f"{stage.name}: towers {stage.towers} are not image/text")
    lists = [f.name for f in dataclasses.fields(DataConfig) if f.type in ("list[str]", list[str])]
    if stage.data not in lists:
        problems.append(f"{stage.name}: data '{stage.data}' is not a DataConfig list ({', '.join(lists)})")
    if not set(stage.term_stages) <= {term.stage for term in TERMS.values()}:
        problems.append(f"{stage.name}: term stages {stage.term_stages} are not loss-term stages")
    if set(stage.checkpoint_prefixes) != set(stage.towers):
        problems.append(f"{stage.name}: checkpoint prefixes {dict(stage.checkpoint_prefixes)} do not name "
                        f"its towers {stage.towers}")
    launcher = PROJECT_ROOT / stage.launcher
    if not launcher.is_file() or f'"--stage", "{stage.name}"' not in launcher.read_text():
        problems.append(f"{stage.name}: no launcher {stage.launcher} running --stage {stage.name}")
    if not (PROJECT_ROOT / "recipes" / "demo" / f"{stage.name}.yaml").is_file():
        problems.append(f"{stage.name}: no demo recipe recipes/demo/{stage.name}.yaml")
    try:
        task = task_class(stage)
    except (ImportError, AttributeError, ValueError) as error:
        problems.append(f"{stage.name}: task {stage.task!r} cannot be imported ({error})")
    else:
        missing = [name for name in TASK_METHODS if not callable(getattr(task, name, None))]
        if missing:
            problems.append(f"{stage.name}: task {stage.task} lacks {', '.join(missing)}")
    return problems


@pytest.mark.parametrize("name", STAGES)
def test_every_stage_declares_everything_it_is_read_for(name):
    assert STAGES[name].name == name
    assert stage_problems(STAGES[name]) == []


@pytest.mark.parametrize("change, problem", [
    ({"launcher": ""}, "'launcher' is not declared"),
    ({"launcher": "launch/stage9.sh"}, "no launcher launch/stage9.sh"),
    ({"task": "tinyclip_ds.train.stage1:Stage9Task"}, "cannot be imported"),
    ({"task": "tinyclip_ds.train.records:RECORD"}, "lacks for_recipe"),
    ({"data": "videos"}, "data 'videos' is not a DataConfig list"),
    ({"checkpoint_prefixes": {}}, "'checkpoint_prefixes' is not declared"),
    ({"checkpoint_prefixes": {"image": "tower."}, "towers": ("text",)}, "do not name its towers"),
    ({"term_stages": ("stage3",)}, "are not loss-term stages"),
    ({"name": "stage9", "task": "tinyclip_ds.train.stage1:Stage1Task"}, "no demo recipe"),
])
def test_a_stage_missing_a_declaration_is_found(change, problem):
    broken = dataclasses.replace(STAGES["stage1_text"], **change)
    assert any(problem in line for line in stage_problems(broken)), stage_problems(broken)


def test_every_task_class_in_train_has_a_row():
    """A task file without a row would never run: every class of the Task shape is in the table."""
    import importlib
    import pkgutil

    import tinyclip_ds.train as train

    named = {row.task for row in STAGES.values()}
    for module in pkgutil.iter_modules(train.__path__):
        loaded = importlib.import_module(f"tinyclip_ds.train.{module.name}")
        for name, cls in inspect.getmembers(loaded, inspect.isclass):
            if (cls.__module__ == loaded.__name__ and cls is not Task
                    and all(callable(getattr(cls, m, None)) for m in TASK_METHODS)):
                assert f"{cls.__module__}:{name}" in named, f"{cls.__module__}:{name} has no row in STAGES"


def test_recipes_take_their_stage_choices_towers_and_data_from_the_table():
    assert [row.towers for row in STAGES.values()] == [Recipe(stage=name).towers for name in STAGES]
    for name, row in STAGES.items():
        with pytest.raises(RecipeError, match=re.escape(f"a {name} recipe needs training data in 'data.{row.data}'")):
            load_recipe(demo_recipe_path(name), [f"data.{row.data}=[]"])
    with pytest.raises(RecipeError, match=re.escape(f"use {STAGES['stage2'].launcher}")):
        load_recipe(demo_recipe_path("stage2"), stage="stage1_text")


@pytest.fixture(scope="module")
def demo_teacher():
    return load_teacher(load_recipe(demo_recipe_path("stage2")).teacher)


@pytest.mark.parametrize("name", STAGES)
def test_a_task_is_built_alone_and_keeps_its_towers_where_its_row_says(name, demo_teacher):
    """No run, no DeepSpeed, no distributed group: the task from its explicit inputs."""
    recipe = load_recipe(demo_recipe_path(name), ["data.num_workers=0"])
    lines: list[str] = []
    task = task_class(STAGES[name]).for_recipe(recipe, demo_teacher, torch.device("cpu"), 0, lines.append, {})
    row = STAGES[name]
    assert set(task.students) == set(row.towers)
    record = model_record(task.module)
    assert record["stage"] == name and set(record["towers"]) == set(row.towers)
    for kind, prefix in row.checkpoint_prefixes.items():
        assert any(parameter.startswith(prefix) for parameter in record["parameters"]), (kind, prefix)

    dataset = task.dataset()
    assert len(dataset) == sum(dataset.source.sizes) > 0
    assert any(line.startswith("training data: ") for line in lines)

    size = demo_teacher.image_size
    inputs = {"image": torch.randn(2, 3, size, size), "text": demo_teacher.tokenizer(["a 3", "a 7 on the left"])}
    image, text = task.encoders(task.module)
    with torch.no_grad():
        for kind, encoder in (("image", image), ("text", text)):
            assert (encoder is not None) == (kind in row.towers), kind
            if encoder is not None:
                assert encoder(inputs[kind]).shape == (2, demo_teacher.clip.visual.shape.output_dim), kind
