"""Layer maps: which teacher layer each distilled student layer learns from.

Maps are over *effective* layers: a weight-shared student with 4 unique blocks applied twice
has 8, and any subset of them may be distilled. A recipe selects the student layers that get
intermediate-layer losses (``distill_layers``; null = all) and a strategy maps those S
selected layers, in order, onto the teacher's T layers:

- ``uniform`` (TinyBERT): the i-th selected layer ↔ teacher floor((i + 1)·T/S) − 1, which is
  i·k + k − 1 when k = T/S is whole; strictly increasing, and the last ↔ the last.
- ``begin``: i ↔ i.
- ``end``: i ↔ T − S + i.
- an explicit list of teacher layers, one per selected student layer, e.g. ``[0, 1, 10, 11]``.
"""

from __future__ import annotations

import difflib

from tinyclip_ds.config import RecipeError


def uniform(teacher_layers: int, student_layers: int) -> list[int]:
    """TinyBERT's map: student i ↔ teacher floor((i + 1)·T/S) − 1 (= i·k + k − 1 for k = T/S)."""
    _check_fewer(teacher_layers, student_layers)
    return [(i + 1) * teacher_layers // student_layers - 1 for i in range(student_layers)]


def begin(teacher_layers: int, student_layers: int) -> list[int]:
    """Student i ↔ teacher i: the student learns from the teacher's first layers."""
    _check_fewer(teacher_layers, student_layers)
    return list(range(student_layers))


def end(teacher_layers: int, student_layers: int) -> list[int]:
    """Student i ↔ teacher T − S + i: the student learns from the teacher's last layers."""
    _check_fewer(teacher_layers, student_layers)
    return list(range(teacher_layers - student_layers, teacher_layers))


STRATEGIES = {"uniform": uniform, "begin": begin, "end": end}


def _check_fewer(teacher_layers: int, student_layers: int) -> None:
    if student_layers > teacher_layers:
        raise ValueError(f"{student_layers} student layers cannot each learn from a different "
                         f"one of the teacher's {teacher_layers} layers")


def resolve(spec: str | list[int], teacher_depth: int, student_depth: int,
            distill_layers: list[int] | None, key: str) -> list[tuple[int, int]]:
    """``(student_layer, teacher_layer)`` pairs for the distilled student layers, in layer order.

    ``spec`` is a strategy name or an explicit list of teacher layers; ``distill_layers`` the
    selected effective student layers (None = all). ``key`` is the tower's recipe section, e.g.
    ``student.image``: errors are `RecipeError` naming ``<key>.layer_map`` or
    ``<key>.distill_layers``.
    """
    selected = _selected_layers(distill_layers, student_depth, f"{key}.distill_layers")
    what = f"{len(selected)} distilled student layers ('{key}.distill_layers' = {distill_layers})"
    if isinstance(spec, str):
        if spec not in STRATEGIES:
            close = difflib.get_close_matches(spec, STRATEGIES, n=1)
            hint = f"did you mean '{close[0]}'? " if close else ""
            raise RecipeError(f"'{key}.layer_map' = {spec!r} is not a layer map; {hint}use one of "
                              f"{', '.join(STRATEGIES)} or a list of teacher layers")
        try:
            teacher = STRATEGIES[spec](teacher_depth, len(selected))
        except ValueError as err:
            raise RecipeError(f"'{key}.layer_map' = {spec!r} maps {what} onto a teacher of "
                              f"{teacher_depth} layers: {err}; select at most {teacher_depth} layers "
                              f"with '{key}.distill_layers' or build a shallower student") from None
    else:
        teacher = list(spec)
        if len(teacher) != len(selected):
            raise RecipeError(f"'{key}.layer_map' = {spec} lists {len(teacher)} teacher layers but "
                              f"there are {what}; give one teacher layer per distilled student layer")
        _check_indices(teacher, teacher_depth, f"{key}.layer_map", "teacher")
    return list(zip(selected, teacher))


def inheritance_map(spec: str | list[int], teacher_depth: int, student_depth: int,
                    distill_layers: list[int] | None, key: str) -> list[tuple[int, int]]:
    """The teacher layer that weight inheritance copies into *every* effective student layer.

    Inheritance needs a source for all effective layers, also those that are not distilled:

    - a strategy name: the strategy over all effective layers, whatever ``distill_layers`` is;
    - an explicit list covering every effective layer: that list;
    - an explicit list covering only the distilled subset: ``uniform`` over all effective layers.

    The recipe's distillation map is validated on the way (same errors as `resolve`).
    """
    distilled = resolve(spec, teacher_depth, student_depth, distill_layers, key)
    if student_depth > teacher_depth:
        raise RecipeError(f"'{key}.init' = 'inherit' copies a different teacher layer into each of "
                          f"the student's {student_depth} effective layers, but the teacher has "
                          f"only {teacher_depth}; use init: random or fewer layers × repeat")
    if isinstance(spec, list) and len(distilled) == student_depth:
        return distilled
    return resolve(spec if isinstance(spec, str) else "uniform", teacher_depth, student_depth,
                   None, key)


def _selected_layers(distill_layers: list[int] | None, student_depth: int, key: str) -> list[int]:
    if distill_layers is None:
        return list(range(student_depth))
    _check_indices(distill_layers, student_depth, key, "effective student")
    return sorted(distill_layers)


def _check_indices(layers: list[int], depth: int, key: str, what: str) -> None:
    bad = [layer for layer in layers if not 0 <= layer < depth]
    if bad:
        raise RecipeError(f"'{key}' = {layers}: {bad} out of range; the {what} layers are "
                          f"0..{depth - 1}")
    repeated = sorted({layer for layer in layers if layers.count(layer) > 1})
    if repeated:
        raise RecipeError(f"'{key}' = {layers} names {repeated} more than once; each layer may "
                          f"appear once")
