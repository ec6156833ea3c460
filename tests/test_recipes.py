"""Recipes: every shipped recipe validates; bad recipes fail early with precise messages."""

from pathlib import Path

import pytest
import yaml

from tinyclip_ds.cli import main
from tinyclip_ds.config import PROJECT_ROOT, RecipeError
from tinyclip_ds.recipe import Recipe, load_recipe

RECIPES = PROJECT_ROOT / "recipes"
# Fragments meant only to be inherited live in folders whose name starts with "_" or in
# recipes/students/; they are validated through the recipes that use them.
SHIPPED = sorted(p for p in RECIPES.rglob("*.yaml")
                 if not any(part.startswith("_") or part == "students"
                            for part in p.relative_to(RECIPES).parts[:-1]))


def test_shipped_recipes_exist():
    assert len(SHIPPED) >= 3
    assert {"stage1_image.yaml", "stage1_text.yaml", "stage2.yaml"} <= {p.name for p in SHIPPED}


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(RECIPES)))
def test_check_every_shipped_recipe(path, capsys):
    # Real-teacher recipes name weights and COCO files this machine does not have.
    demo = path.parent.name == "demo"
    assert main(["check", str(path), *([] if demo else ["--no-paths"])]) == 0
    out = capsys.readouterr().out
    assert "recipe OK" in out and "global batch" in out
    # the printed tree is the resolved recipe and loads back to the same recipe
    # (DeepSpeed's logger may add "[date] [WARNING] ..." lines to stdout)
    resolved = yaml.safe_load("\n".join(l for l in out.splitlines() if not l.startswith("[")))
    assert resolved == yaml.safe_load(load_recipe(path).to_yaml())


def test_fragments_are_used_by_some_recipe():
    """Every fragment is inherited by at least one shipped recipe, so it is validated too."""
    fragments = {p.resolve() for p in RECIPES.rglob("*.yaml")} - {p.resolve() for p in SHIPPED}
    used = set()

    def collect(path: Path):
        data = yaml.safe_load(path.read_text()) or {}
        bases = data.get("base", [])
        for base in [bases] if isinstance(bases, str) else bases:
            resolved = (path.parent / base).resolve()
            used.add(resolved)
            collect(resolved)

    for path in SHIPPED:
        collect(path)
    assert fragments - used == set()


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return path


BASE = """
stage: stage1_image
data: {images: [demo:digits]}
loss: {rep_l1: 1.0}
train: {steps: 10, micro_batch: 4}
"""


def test_misspelt_key_names_dotted_key_file_and_suggestion(tmp_path, capsys):
    base = write(tmp_path, "base.yaml", BASE)
    path = write(tmp_path, "r.yaml", f"base: {base.name}\ntrain:\n  warmup_stpes: 3\n")
    assert main(["check", str(path)]) == 2
    err = capsys.readouterr().err
    assert "unknown recipe key 'train.warmup_stpes'" in err
    assert str(path) in err
    assert "did you mean 'train.warmup_steps'" in err
    with pytest.raises(RecipeError, match=r"loss\.rep_cosine.*did you mean 'loss\.rep_cos'"):
        load_recipe(write(tmp_path, "r2.yaml", f"base: {base.name}\nloss: {{rep_cosine: 1.0}}\n"))


def test_unknown_key_in_base_names_the_base_file(tmp_path):
    base = write(tmp_path, "base.yaml", BASE + "student:\n  image:\n    layrs: 3\n")
    path = write(tmp_path, "r.yaml", f"base: {base.name}\n")
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    assert "student.image.layrs" in str(err.value)
    assert str(base) in str(err.value)
    assert "student.image.layers" in str(err.value)


def test_key_in_wrong_section_suggests_the_right_one(tmp_path):
    path = write(tmp_path, "r.yaml", BASE + "eval: {heads: 4}\n")
    with pytest.raises(RecipeError, match=r"eval\.heads.*student\.(image|text)\.heads"):
        load_recipe(path)


def test_wrong_typed_set_is_an_error(tmp_path, capsys):
    path = write(tmp_path, "r.yaml", BASE)
    assert main(["check", str(path), "--set", "train.steps=many"]) == 2
    err = capsys.readouterr().err
    assert "train.steps" in err and "int" in err and "many" in err
    with pytest.raises(RecipeError, match=r"'train\.lr' \(r\.yaml|train\.lr.*float"):
        load_recipe(write(tmp_path, "bad.yaml", BASE.replace("steps: 10", "steps: 10, lr: fast")))
    with pytest.raises(RecipeError, match="student.image.layer_map"):
        load_recipe(path, ["student.image.layer_map={a: 1}"])
    with pytest.raises(RecipeError, match=r"unknown recipe key 'train\.stepz'.*--set.*train\.steps"):
        load_recipe(path, ["train.stepz=3"])


def test_set_parses_values_to_field_types(tmp_path):
    path = write(tmp_path, "r.yaml", BASE)
    recipe = load_recipe(path, ["train.lr=3e-4", "student.image.layers=3", "data.randaugment=false",
                                "student.image.layer_map=[0, 1, 10]", "student.image.distill_layers=null",
                                "name=my run", "deepspeed.zero_optimization.stage=3"])
    assert recipe.train.lr == 3e-4 and isinstance(recipe.train.lr, float)
    assert recipe.student.image.layers == 3
    assert recipe.data.randaugment is False
    assert recipe.student.image.layer_map == [0, 1, 10]
    assert recipe.name == "my run"
    assert recipe.deepspeed == {"zero_optimization": {"stage": 3}}


def test_yaml_exponent_without_dot_is_a_float(tmp_path):
    recipe = load_recipe(write(tmp_path, "r.yaml", BASE.replace("steps: 10", "steps: 10, lr: 3e-4")))
    assert recipe.train.lr == 3e-4


def test_missing_base_names_the_path(tmp_path):
    path = write(tmp_path, "r.yaml", "base: nowhere/base.yaml\n")
    with pytest.raises(RecipeError, match=r"not found: .*nowhere/base\.yaml.*r\.yaml"):
        load_recipe(path)


def test_inheritance_order_and_lists(tmp_path):
    write(tmp_path, "a.yaml", BASE + "seed: 1\n")
    write(tmp_path, "b.yaml", "seed: 2\ntrain: {lr: 0.5}\n")
    recipe = load_recipe(write(tmp_path, "r.yaml", "base: [a.yaml, b.yaml]\ntrain: {steps: 7}\n"))
    assert (recipe.seed, recipe.train.lr, recipe.train.steps, recipe.train.micro_batch) == (2, 0.5, 7, 4)


def test_cross_section_rules(tmp_path):
    path = write(tmp_path, "r.yaml", BASE)
    with pytest.raises(RecipeError, match="loss.contrastive"):
        load_recipe(path, ["loss.contrastive=1"])
    with pytest.raises(RecipeError, match="no loss term"):
        load_recipe(path, ["loss.rep_l1=0"])
    with pytest.raises(RecipeError, match="data.captions"):
        load_recipe(path, ["stage=stage1_text"])
    with pytest.raises(RecipeError, match="launch/stage1_image.sh"):
        load_recipe(path, stage="stage2")


def test_every_field_has_a_description(capsys):
    assert main(["recipe"]) == 0
    out = capsys.readouterr().out
    from tinyclip_ds.config import describe
    rows = describe(Recipe)
    assert all(help_text.strip() for *_, help_text in rows), [r[0] for r in rows if not r[3].strip()]
    assert "train.lr" in out and "peak learning rate" in out


def test_every_numeric_field_has_a_range_and_its_default_is_in_it():
    """A numeric field says in its own option(...) which values it accepts: a Range, or
    Range() to accept any finite value (tests/test_config_fields.py shows this walk failing)."""
    from tinyclip_ds.config import numeric_fields

    fields = numeric_fields(Recipe())
    assert {key for key, _, _ in fields} >= {"seed", "train.lr", "loss.rep_l1", "student.text.layers"}
    assert [key for key, f, _ in fields if "range" not in f.metadata] == []
    assert [key for key, f, value in fields if value not in f.metadata["range"]] == []


def test_range_errors_name_the_file_that_set_the_value(tmp_path):
    path = write(tmp_path, "r.yaml", BASE.replace("steps: 10", "steps: 10, lr: .nan"))
    with pytest.raises(RecipeError, match=rf"'train.lr' \({path}\) must be a finite number >= 0, got nan"):
        load_recipe(path)
