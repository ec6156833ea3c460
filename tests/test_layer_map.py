"""Layer maps: each strategy on hand-computed examples, and every impossible map's error."""

import pytest

from tinyclip_ds.config import RecipeError
from tinyclip_ds.models import layer_map
from tinyclip_ds.models.layer_map import inheritance_map, resolve

KEY = "student.image"


def test_uniform_divisible_is_tinybert():
    # k = 12 / 4 = 3: student i ↔ teacher 3i + 2
    assert layer_map.uniform(teacher_layers=12, student_layers=4) == [2, 5, 8, 11]
    assert layer_map.uniform(12, 6) == [1, 3, 5, 7, 9, 11]
    assert layer_map.uniform(12, 12) == list(range(12))
    assert layer_map.uniform(12, 1) == [11]


def test_uniform_not_divisible():
    # floor((i+1)·12/5) − 1 for i = 0..4: floor(2.4)−1, floor(4.8)−1, floor(7.2)−1, floor(9.6)−1, 12−1
    assert layer_map.uniform(12, 5) == [1, 3, 6, 8, 11]
    # floor((i+1)·12/7) − 1: 1.71→0, 3.43→2, 5.14→4, 6.86→5, 8.57→7, 10.29→9, 12→11
    assert layer_map.uniform(12, 7) == [0, 2, 4, 5, 7, 9, 11]
    for student in range(1, 13):
        teacher = layer_map.uniform(12, student)
        assert all(a < b for a, b in zip(teacher, teacher[1:])) and teacher[-1] == 11


def test_begin_and_end():
    assert layer_map.begin(12, 4) == [0, 1, 2, 3]
    assert layer_map.end(12, 4) == [8, 9, 10, 11]
    assert layer_map.end(6, 6) == [0, 1, 2, 3, 4, 5]


def test_resolve_strategies_and_explicit_list():
    assert resolve("uniform", 12, 4, None, KEY) == [(0, 2), (1, 5), (2, 8), (3, 11)]
    assert resolve("begin", 12, 4, None, KEY) == [(0, 0), (1, 1), (2, 2), (3, 3)]
    assert resolve("end", 12, 4, None, KEY) == [(0, 8), (1, 9), (2, 10), (3, 11)]
    assert resolve([0, 1, 10, 11], 12, 4, None, KEY) == [(0, 0), (1, 1), (2, 10), (3, 11)]


def test_weight_share_subsets():
    # 4 unique blocks × repeat 2 = 8 effective layers; distil the second application of each.
    assert resolve("uniform", 12, 8, [1, 3, 5, 7], KEY) == [(1, 2), (3, 5), (5, 8), (7, 11)]
    # the selection is sorted before mapping, whatever order the recipe lists it in
    assert resolve("end", 12, 8, [7, 0, 4], KEY) == [(0, 9), (4, 10), (7, 11)]
    assert resolve([3, 11], 12, 8, [6, 2], KEY) == [(2, 3), (6, 11)]
    # all 8 effective layers: floor((i+1)·12/8) − 1 = 0, 2, 3, 5, 6, 8, 9, 11
    assert resolve("uniform", 12, 8, None, KEY) == [(0, 0), (1, 2), (2, 3), (3, 5), (4, 6),
                                                    (5, 8), (6, 9), (7, 11)]
    # a subset larger than the teacher is impossible, a smaller one of a deep student is not
    assert resolve("begin", 4, 16, [0, 15], KEY) == [(0, 0), (15, 1)]
    assert resolve("uniform", 12, 4, [], KEY) == []


def test_inheritance_map_covers_every_effective_layer():
    everything = [(0, 2), (1, 5), (2, 8), (3, 11)]
    assert inheritance_map("uniform", 12, 4, [1, 3], KEY) == everything
    assert inheritance_map("begin", 12, 4, [3], KEY) == [(0, 0), (1, 1), (2, 2), (3, 3)]
    assert inheritance_map([0, 1, 10, 11], 12, 4, None, KEY) == [(0, 0), (1, 1), (2, 10), (3, 11)]
    # an explicit list over a subset says nothing about the other layers: uniform over all
    assert inheritance_map([0, 11], 12, 4, [1, 3], KEY) == everything


@pytest.mark.parametrize("spec, teacher, student, selected, pattern", [
    ("unifrom", 12, 4, None,
     r"'student\.image\.layer_map' = 'unifrom'.*did you mean 'uniform'.*uniform, begin, end"),
    ("middle", 12, 4, None, r"'student\.image\.layer_map' = 'middle'.*uniform, begin, end"),
    ("uniform", 4, 6, None, r"'student\.image\.layer_map'.*6 distilled.*teacher of 4 layers"),
    ("begin", 4, 6, None, r"'student\.image\.layer_map' = 'begin'.*student\.image\.distill_layers"),
    ("end", 2, 8, [0, 1, 2], r"'student\.image\.layer_map' = 'end'.*3 distilled"),
    ([0, 1, 12, 11], 12, 4, None, r"'student\.image\.layer_map' = \[0, 1, 12, 11\]: \[12\] out of range.*0\.\.11"),
    ([-1, 1, 2, 3], 12, 4, None, r"'student\.image\.layer_map'.*\[-1\] out of range"),
    ([0, 5, 5, 11], 12, 4, None, r"'student\.image\.layer_map'.*\[5\] more than once"),
    ([0, 1, 11], 12, 4, None, r"'student\.image\.layer_map'.*3 teacher layers.*4 distilled"),
    ([0, 1, 11], 12, 8, [1, 3], r"'student\.image\.layer_map'.*3 teacher layers.*2 distilled"),
    ("uniform", 12, 8, [1, 8], r"'student\.image\.distill_layers' = \[1, 8\]: \[8\] out of range.*0\.\.7"),
    ("uniform", 12, 8, [-1], r"'student\.image\.distill_layers'.*\[-1\] out of range"),
    ("uniform", 12, 8, [1, 3, 1], r"'student\.image\.distill_layers'.*\[1\] more than once"),
])
def test_impossible_maps_name_the_key(spec, teacher, student, selected, pattern):
    with pytest.raises(RecipeError, match=pattern):
        resolve(spec, teacher, student, selected, KEY)
    with pytest.raises(RecipeError, match=pattern):
        inheritance_map(spec, teacher, student, selected, KEY)


def test_strategies_refuse_more_student_than_teacher_layers():
    for strategy in (layer_map.uniform, layer_map.begin, layer_map.end):
        with pytest.raises(ValueError, match="5 student layers"):
            strategy(4, 5)


def test_inheritance_needs_a_teacher_layer_per_effective_layer():
    # distilling 2 of 16 effective layers from a 12-layer teacher is fine, inheriting is not
    assert resolve("uniform", 12, 16, [3, 15], KEY) == [(3, 5), (15, 11)]
    with pytest.raises(RecipeError, match=r"'student\.image\.init'.*16 effective layers.*only 12"):
        inheritance_map("uniform", 12, 16, [3, 15], KEY)
