"""A config field carries its own valid range (and choices) in its `option(...)`: validation reads
them from the field wherever it sits in the tree, so a renamed or moved field keeps its check,
and a numeric field without a declaration is refused instead of silently accepting anything."""

from __future__ import annotations

import dataclasses

import pytest

from tinyclip_ds.config import Range, RecipeError, check_ranges, describe, numeric_fields, option
from tinyclip_ds.recipe import Recipe, load_recipe
from tinyclip_ds.stages import STAGES


@dataclasses.dataclass
class Tower:
    layers: int = option(4, "blocks", range=Range(1))
    offset: float = option(0.0, "any finite offset: negative values shift left", range=Range())


@dataclasses.dataclass
class Model:
    image: Tower = option(Tower(), "one tower")
    renamed: Tower = option(Tower(), "the same section under another name")


def test_the_range_is_read_from_the_field_itself():
    check_ranges(Model(), {})
    with pytest.raises(RecipeError, match=r"^'image.layers' \(recipe\) must be >= 1, got 0$"):
        check_ranges(Model(image=Tower(layers=0)), {})
    # the same field under a name no table knows keeps its range
    with pytest.raises(RecipeError, match=r"^'renamed.layers' \(a.yaml\) must be >= 1, got -2$"):
        check_ranges(Model(renamed=Tower(layers=-2)), {"renamed.layers": "a.yaml"})
    tally = dataclasses.make_dataclass("Tally", [("tally", int, option(1, "a count", range=Range(1)))])
    with pytest.raises(RecipeError, match=r"^'tally' \(recipe\) must be >= 1, got 0$"):
        check_ranges(tally(tally=0), {})


def test_range_of_any_finite_value_is_declared_and_still_refuses_nan():
    check_ranges(Model(image=Tower(offset=-1e300)), {})
    with pytest.raises(RecipeError, match=r"^'image.offset' \(recipe\) must be a finite number, got nan$"):
        check_ranges(Model(image=Tower(offset=float("nan"))), {})


def test_a_numeric_field_without_a_range_is_refused():
    bare = dataclasses.make_dataclass("Bare", [("steps", int, option(3, "no range given"))])
    assert [key for key, f, _ in numeric_fields(bare()) if "range" not in f.metadata] == ["steps"]
    with pytest.raises(TypeError, match="'steps' declares no range"):
        check_ranges(bare(), {})


def test_recipe_ranges_come_from_the_section_options():
    """Both student towers share one config class, so both get its ranges; the recipe's
    numeric values are checked from their options, with the file or --set that gave them."""
    with pytest.raises(RecipeError, match=r"^'student.text.dropout' \(--set\) must be a finite number in "
                                          r"\[0, 1\), got 1.0$"):
        load_recipe(None, ["student.text.dropout=1"], stage="stage1_text")
    with pytest.raises(RecipeError, match=r"'student.text.heads' \(--set\) must be >= 0 \(0 = the teacher's\)"):
        load_recipe(None, ["student.text.heads=-1"], stage="stage1_text")


def test_stage_choices_come_from_the_stage_table(tmp_path):
    names = ", ".join(repr(name) for name in STAGES)
    assert names == "'stage1_image', 'stage1_text', 'stage2'"
    with pytest.raises(RecipeError, match=rf"^'stage' \(--set\) must be one of {names}; got 'stage3'$"):
        load_recipe(None, ["stage=stage3"], stage="stage2")
    recipe = tmp_path / "r.yaml"
    recipe.write_text("stage: stage9\n")
    with pytest.raises(RecipeError, match=rf"^'stage' \({recipe}\) must be one of {names}; got 'stage9'$"):
        load_recipe(recipe)
    assert load_recipe(None, ["stage= stage2"], stage="stage2").stage == "stage2"  # parsed like a Literal


def test_recipe_command_shows_ranges_and_choices():
    rows = {key: type_name for key, type_name, _, _ in describe(Recipe)}
    assert rows["train.lr"] == "float >= 0"
    assert rows["train.beta1"] == "float in [0, 1)"
    assert rows["data.randaugment_magnitude"] == "int in [0, 30]"
    assert rows["stage"] == "'stage1_image' | 'stage1_text' | 'stage2'"
    assert rows["name"] == "str"
