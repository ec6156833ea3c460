"""Students: smaller CLIP towers built from a teacher's shape, optionally weight-shared.

A student tower is a `VisionTower` / `TextTower` whose `TowerShape` comes from the recipe's
`StudentTowerConfig` with the teacher's values filling the zeros (`student_shape`). It starts
from the tower's own random initialisation or inherits the teacher's mapped layers, sliced to
its width (`inherit_from_teacher`); `build_students` builds the towers a stage trains, each
with the teacher tower and the layer pairs its distillation uses.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from tinyclip_ds.config import RecipeError
from tinyclip_ds.models import layer_map
from tinyclip_ds.models.config import StudentConfig, StudentTowerConfig
from tinyclip_ds.models.transformer import Clip, TextTower, TowerShape, VisionTower


Tower = VisionTower | TextTower


@dataclass
class Student:
    """A built student tower with what distillation needs to know about it."""
    kind: str                                # "image" | "text"
    tower: Tower
    teacher: Tower                           # the teacher's tower of the same kind (frozen; not owned)
    layer_pairs: list[tuple[int, int]]       # (student layer, teacher layer), resolved once per tower
    key: str                                 # "student.image" / "student.text", names recipe fields in errors


def tower_of(clip: Clip, kind: str) -> Tower:
    """The tower of ``kind`` ("image" or "text") of a `Clip`."""
    if kind not in ("image", "text"):
        raise ValueError(f"unknown tower kind {kind!r}; expected 'image' or 'text'")
    return clip.visual if kind == "image" else clip.text


def student_shape(kind: Literal["image", "text"], teacher: TowerShape, cfg: StudentTowerConfig,
                  key: str) -> TowerShape:
    """The student tower's architecture: the recipe's fields, the teacher's where they are 0.

    Image size, vocabulary, EOT token and LayerNorm epsilon always come from the teacher, so
    the student reads the same inputs. ``key`` (e.g. ``student.image``) prefixes error keys.
    """
    for name in ("width", "heads", "output_dim", "patch_size", "context_length"):
        if getattr(cfg, name) < 0:
            raise RecipeError(f"'{key}.{name}' must be >= 0 (0 = the teacher's), got {getattr(cfg, name)}")
    other_kind, other_field = ("text", "context_length") if kind == "image" else ("image", "patch_size")
    if getattr(cfg, other_field):
        raise RecipeError(f"'{key}.{other_field}' applies to the {other_kind} tower only; remove it")
    if not 0 <= cfg.dropout < 1:
        raise RecipeError(f"'{key}.dropout' must be in [0, 1), got {cfg.dropout}")
    width = cfg.width or teacher.width
    heads = cfg.heads or teacher.heads
    if width % heads:
        raise RecipeError(f"'{key}.heads' = {heads} does not divide the width {width}; pick a head "
                          f"count that divides it (or change '{key}.width')")
    mlp_width = round(width * cfg.mlp_ratio)
    if mlp_width < 1:
        raise RecipeError(f"'{key}.mlp_ratio' = {cfg.mlp_ratio} gives an MLP of {mlp_width} channels "
                          f"at width {width}; it must be > 0")
    changes = dict(width=width, layers=cfg.layers, heads=heads, mlp_width=mlp_width,
                   output_dim=cfg.output_dim or teacher.output_dim, repeat=cfg.repeat,
                   act=teacher.act if cfg.act == "teacher" else cfg.act, dropout=cfg.dropout)
    if kind == "image":
        changes["patch_size"] = cfg.patch_size or teacher.patch_size
        if teacher.image_size % changes["patch_size"]:
            raise RecipeError(f"'{key}.patch_size' = {cfg.patch_size} does not divide the teacher's "
                              f"image size {teacher.image_size}")
    else:
        changes["context_length"] = cfg.context_length or teacher.context_length
        if changes["context_length"] > teacher.context_length:
            raise RecipeError(f"'{key}.context_length' = {cfg.context_length} is longer than the "
                              f"teacher's {teacher.context_length}: the teacher reads the same tokens")
    return teacher.replace(**changes)


SHAPE_FIELDS = {
    "image": ("width", "layers", "heads", "mlp_width", "output_dim", "repeat", "act", "ln_eps",
              "image_size", "patch_size"),
    "text": ("width", "layers", "heads", "mlp_width", "output_dim", "repeat", "act", "ln_eps",
             "vocab_size", "context_length", "eot_token_id"),
}
"""The `TowerShape` fields that define a tower of each kind: two towers that agree on them have
the same parameters and compute the same function. Dropout, a training setting, is left out;
head count and activation change no parameter shape, which is why they must be recorded."""


def student_shapes(cfg: StudentConfig, teacher: Clip, kinds: Sequence[str]) -> dict[str, TowerShape]:
    """The shapes of the student towers of ``kinds`` ("image", "text"), without building them."""
    return {kind: student_shape(kind, tower_of(teacher, kind).shape, getattr(cfg, kind),
                                f"student.{kind}")
            for kind in kinds}


def shape_record(kind: Literal["image", "text"], shape: TowerShape) -> dict:
    """The defining fields of a ``kind`` tower's shape as plain JSON data (checkpoints, exports)."""
    return {name: getattr(shape, name) for name in SHAPE_FIELDS[kind]}


def shape_differences(kind: Literal["image", "text"], saved: dict,
                      shape: TowerShape) -> list[tuple[str, object, object]]:
    """``(student.<kind>.<field>, saved value, value of shape)`` for each defining field that
    differs between a `shape_record` and ``shape``."""
    return [(f"student.{kind}.{name}", saved[name], getattr(shape, name))
            for name in SHAPE_FIELDS[kind] if name in saved and saved[name] != getattr(shape, name)]


def describe_differences(differences: list[tuple[str, object, object]]) -> tuple[str, str]:
    """``("k1=saved1, k2=saved2", "k1=now1, k2=now2")`` for messages about `shape_differences`."""
    return (", ".join(f"{key}={saved}" for key, saved, _ in differences),
            ", ".join(f"{key}={now}" for key, _, now in differences))


def tower_from_record(kind: Literal["image", "text"], record: dict) -> Tower:
    """A fresh, randomly initialised tower of the shape a `shape_record` describes."""
    shape = TowerShape(**{name: record[name] for name in SHAPE_FIELDS[kind]})
    return VisionTower(shape) if kind == "image" else TextTower(shape)


def tower_parameter_shapes(kind: Literal["image", "text"], shape: TowerShape) -> dict[str, list[int]]:
    """Every parameter name of a ``kind`` tower of ``shape`` with its shape (nothing allocated)."""
    with torch.device("meta"):
        tower = VisionTower(shape) if kind == "image" else TextTower(shape)
    return {name: list(param.shape) for name, param in tower.named_parameters()}


def embedding_names(tower: Tower) -> tuple[str, ...]:
    """Parameter names of the tower's input embeddings (what ``freeze_embed`` copies and freezes)."""
    if isinstance(tower, VisionTower):
        return "patch_embed.weight", "class_embedding", "positional_embedding"
    return "token_embedding.weight", "positional_embedding"


def build_student(kind: Literal["image", "text"], teacher_tower: Tower, cfg: StudentTowerConfig,
                  key: str) -> Student:
    """A student tower shaped and initialised by ``cfg``, checked against its teacher tower.

    The distilled layer pairs are resolved here, once (`layer_map.resolve`), so a bad map
    fails at build time and inheritance and distillation read the same map.
    ``init: inherit`` copies the teacher's mapped layers (`inherit_from_teacher`, layers chosen
    by `layer_map.inheritance_map`, which extends those pairs to every effective layer);
    ``random`` keeps the tower's own CLIP initialisation. ``freeze_embed`` copies the teacher's
    embeddings (sliced) and sets requires_grad=False on them. ``init_from`` (stage 2) is applied
    by the trainer after this. The tower's ``init_notes`` list says what was copied, for the
    summary.
    """
    shape = student_shape(kind, teacher_tower.shape, cfg, key)
    teacher_depth = teacher_tower.shape.depth
    layer_pairs = layer_map.resolve(cfg.layer_map, teacher_depth, shape.depth, cfg.distill_layers, key)
    tower = VisionTower(shape) if kind == "image" else TextTower(shape)
    notes = ["random initialisation"]
    if cfg.init == "inherit":
        pairs = layer_map.inheritance_map(cfg.layer_map, teacher_depth, shape.depth,
                                          cfg.distill_layers, key)
        try:
            notes = inherit_from_teacher(tower, teacher_tower, pairs)
        except ValueError as err:
            raise RecipeError(f"'{key}.init' = 'inherit' is impossible: {err}; use init: random "
                              f"or a student no larger than the teacher") from None
    if cfg.freeze_embed:
        if kind == "image" and shape.patch_size != teacher_tower.shape.patch_size:
            raise RecipeError(f"'{key}.freeze_embed' needs the teacher's patch embedding, but "
                              f"'{key}.patch_size' = {shape.patch_size} differs from the teacher's "
                              f"{teacher_tower.shape.patch_size}; set freeze_embed: false or "
                              f"patch_size: 0")
        if shape.width > teacher_tower.shape.width:
            raise RecipeError(f"'{key}.freeze_embed' copies the teacher's embeddings, but the "
                              f"student is wider ({shape.width}) than the teacher "
                              f"({teacher_tower.shape.width}); set freeze_embed: false")
        teacher_params = dict(teacher_tower.named_parameters())
        student_params = dict(tower.named_parameters())
        with torch.no_grad():
            for name in embedding_names(tower):
                copy_leading(student_params[name], teacher_params[name])
                student_params[name].requires_grad_(False)
        notes.append(f"frozen (copied from the teacher): {', '.join(embedding_names(tower))}")
    tower.init_notes = notes
    return Student(kind=kind, tower=tower, teacher=teacher_tower, layer_pairs=layer_pairs, key=key)


def inherit_from_teacher(student: Tower, teacher: Tower,
                         layer_pairs: list[tuple[int, int]]) -> list[str]:
    """Initialise ``student`` from ``teacher`` in place (TinyCLIP's "manual" weight inheritance).

    ``layer_pairs`` gives ``(student effective layer, teacher layer)`` for every effective
    layer. Unique block u copies the attention and MLP of the teacher layer mapped to its first
    application (effective layer u·repeat); every effective layer copies its two LayerNorms
    from its own mapped teacher layer. A narrower student takes the leading channels: q, k and
    v each ``[:w, :w]`` (bias ``[:w]``) inside the fused qkv, attention out ``[:w, :w]``, MLP
    fc ``[:mlp, :w]`` and proj ``[:w, :mlp]``, LayerNorms ``[:w]``, embeddings ``[..., :w]``,
    projection ``[:w, :out]``; heads follow the channels (24 student heads of 32 channels are
    the halves of the teacher's 12 heads of 64). A shorter text context takes the leading
    positions. The patch embedding and the image positional embedding are copied only when the
    patch size matches the teacher's: with another patch size their shapes (kernel, grid)
    differ and they keep their random initialisation.

    Returns a few lines saying what was copied, sliced or left random. Raises ValueError,
    before copying anything, when the student is larger than the teacher anywhere.
    """
    s, t = student.shape, teacher.shape
    _check_inheritable(student, teacher, layer_pairs)
    sources = dict(layer_pairs)
    teacher_params = dict(teacher.named_parameters())
    same_grid = isinstance(student, TextTower) or s.patch_size == t.patch_size
    left_random = () if same_grid else ("patch_embed.weight", "positional_embedding")
    with torch.no_grad():
        for unique, block in enumerate(student.transformer.blocks):
            teacher_layer = sources[unique * s.repeat]
            _copy_module(block, teacher.transformer.blocks[teacher_layer // t.repeat])
        for layer, norms in enumerate(student.transformer.norms):
            _copy_module(norms, teacher.transformer.norms[sources[layer]])
        for name, param in student.named_parameters():
            if not name.startswith("transformer.") and name not in left_random:
                copy_leading(param, teacher_params[name])

    notes = [f"blocks ← teacher layers {[sources[u * s.repeat] for u in range(s.layers)]}"]
    if s.repeat > 1:
        notes.append(f"norms ← teacher layers {[sources[e] for e in range(s.depth)]}")
    sizes = [("width", t.width, s.width), ("MLP", t.mlp_width, s.mlp_width),
             ("output", t.output_dim, s.output_dim)]
    if isinstance(student, TextTower):
        sizes.append(("context", t.context_length, s.context_length))
    sliced = [f"{what} {t_size}→{s_size}" for what, t_size, s_size in sizes if t_size != s_size]
    if sliced:
        notes.append(f"sliced to the leading {', '.join(sliced)}")
    if left_random:
        notes.append(f"left random: {', '.join(left_random)} (patch size {s.patch_size} ≠ "
                     f"teacher's {t.patch_size})")
    return notes


def _check_inheritable(student: Tower, teacher: Tower, layer_pairs: list[tuple[int, int]]) -> None:
    s, t = student.shape, teacher.shape
    if type(student) is not type(teacher):
        raise ValueError(f"a {type(student).__name__} cannot inherit from a {type(teacher).__name__}")
    if (sorted(layer for layer, _ in layer_pairs) != list(range(s.depth))
            or not all(0 <= layer < t.depth for _, layer in layer_pairs)):
        raise ValueError(f"the layer map {layer_pairs} must pair each of the student's {s.depth} "
                         f"effective layers with one of the teacher's {t.depth} layers")
    sizes = ("width", "mlp_width", "output_dim")
    if isinstance(student, TextTower):
        sizes += ("context_length", "vocab_size")
    larger = [f"{name} {getattr(s, name)} > {getattr(t, name)}" for name in sizes
              if getattr(s, name) > getattr(t, name)]
    if larger:
        raise ValueError(f"the student is larger than the teacher ({', '.join(larger)})")


def _copy_module(dst: nn.Module, src: nn.Module) -> None:
    """Copy every parameter of ``src`` into ``dst``, each sliced to its leading entries."""
    sources = dict(src.named_parameters())
    for name, param in dst.named_parameters():
        source = sources[name]
        if name.startswith("attn.qkv."):
            # The fused projection stacks q, k and v: slice each of the three, not the stack.
            param, source = param.unflatten(0, (3, -1)), source.unflatten(0, (3, -1))
        copy_leading(param, source)


def copy_leading(dst: Tensor, src: Tensor) -> None:
    """``dst.copy_(src[:n0, :n1, ...])`` with ``dst``'s shape: the leading channels/positions."""
    dst.copy_(src[tuple(slice(0, n) for n in dst.shape)])


def build_students(cfg: StudentConfig, teacher: Clip, kinds: Sequence[str], seed: int) -> dict[str, Student]:
    """The students of ``kinds`` ("image", "text"), built from the teacher's towers.

    Each tower is seeded with ``seed``, so it is the same whichever stage builds it; the
    global random state is left untouched.
    """
    students = {}
    for kind in kinds:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            students[kind] = build_student(kind, tower_of(teacher, kind), getattr(cfg, kind),
                                           f"student.{kind}")
    return students
